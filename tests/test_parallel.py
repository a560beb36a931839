"""Data-parallel training on several devices and several processes (`phljax.parallel`), on CPU.

JAX fixes its device count when its backend starts and `jax.distributed` joins separate
processes, so the work runs in subprocesses (tests/parallel_worker.py), in float64:

- processes with 4 forced host devices refuse bad device counts, compare one and two sharded
  steps on 2 and 4 devices with the plain single-device step for every scheme, and train 2
  epochs with --devices 1, 2 and 0 (all 4);
- two processes with 2 devices each, joined on localhost (gloo CPU collectives), train the same
  run as one 4-device mesh.

Compilation dominates and runs on one core per process, so the workers are started together at
the start of the module (four processes) and the tests read their reports.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO, SUBPROCESS_ENV

from phljax import distributed

pytestmark = pytest.mark.multidevice

WORKER = os.path.join(REPO, "tests", "parallel_worker.py")
SCHEMES = ("none", "onehot", "random", "full")
# worker name -> its steps (the E-F-HVP random steps compile what the runs then load from the cache)
DEVICE_WORKERS = {"steps": ["--schemes", "none,onehot,full"], "runs": ["--schemes", "random", "--runs"]}
TIMEOUT = 900  # s for all workers; a hung collective fails the tests instead of hanging them


def worker_env(n_devices: int) -> dict[str, str]:
    drop = ("SLURM_", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
    env = {k: v for k, v in SUBPROCESS_ENV.items() if not k.startswith(drop)}
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n_devices}".strip()
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture
def no_cluster(monkeypatch):
    """No JAX_* or SLURM_* variables; `jax.distributed.initialize` records its arguments instead."""
    for key in list(os.environ):
        if key.startswith(("SLURM_", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")):
            monkeypatch.delenv(key)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *args, **kwargs: calls.append(args))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    return calls


def test_initialize_single_process_does_nothing(no_cluster, monkeypatch):
    assert not distributed.initialize()
    assert not distributed.initialize(num_processes=1)
    monkeypatch.setenv("SLURM_NTASKS", "1")  # a one-task SLURM job is one process
    for key in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID"):
        monkeypatch.setenv(key, "0")
    assert not distributed.initialize()
    assert no_cluster == []


def test_initialize_from_flags_environment_and_slurm(no_cluster, monkeypatch):
    distributed.initialize("node0:1234", 4, 3)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "node1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    distributed.initialize()
    distributed.initialize(process_id=0)  # flags win over the environment
    for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(key)
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "gpu[01-02]", "SLURM_NTASKS": "8"}
    for key, value in {**slurm, "SLURM_PROCID": "5", "SLURM_LOCALID": "1"}.items():
        monkeypatch.setenv(key, value)
    distributed.initialize()  # jax reads the rest from SLURM
    assert no_cluster == [("node0:1234", 4, 3), ("node1:1234", 2, 1), ("node1:1234", 2, 0), (None, None, None)]


def test_initialize_refuses_incomplete_settings(no_cluster, monkeypatch):
    with pytest.raises(ValueError, match="needs --num-processes, --process-id"):
        distributed.initialize("node0:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    with pytest.raises(ValueError, match="needs --coordinator-address, --process-id"):
        distributed.initialize()
    with pytest.raises(ValueError, match=r"--process-id 2 must lie in \[0, 2\)"):
        distributed.initialize("node0:1234", process_id=2)
    monkeypatch.setenv("JAX_PROCESS_ID", "one")
    with pytest.raises(ValueError, match="JAX_PROCESS_ID must be an integer"):
        distributed.initialize("node0:1234")
    assert no_cluster == []


@pytest.fixture(scope="module")
def workers(h5_path, tmp_path_factory):
    """Start every worker at once; yields {name: (Popen, output folder)} and kills leftovers."""
    out = tmp_path_factory.mktemp("parallel")
    procs = {}

    def start(name, args, n_devices):
        log = open(out / f"{name}.log", "w")  # noqa: SIM115 (closed below)
        cmd = [sys.executable, WORKER, *args]
        procs[name] = (
            subprocess.Popen(cmd, env=worker_env(n_devices), cwd=REPO, stdout=log, stderr=subprocess.STDOUT),
            log,
        )

    port = str(free_port())
    for rank in (0, 1):
        start(f"process{rank}", ["process", h5_path, str(out), port, str(rank)], 2)
    for name, options in DEVICE_WORKERS.items():
        start(name, ["devices", h5_path, str(out), name, *options], 4)
    yield {name: proc for name, (proc, _) in procs.items()}, out
    for proc, log in procs.values():
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        log.close()


def finished(workers, *names) -> None:
    """Wait for the named workers; fail with the end of the log of one that did not succeed."""
    procs, out = workers
    for name in names:
        proc = procs[name]
        try:
            proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.returncode != 0:
            log = (out / f"{name}.log").read_text()
            pytest.fail(f"worker {name} exited with {proc.returncode}:\n{log[-6000:]}")


@pytest.fixture(scope="module")
def single(workers):
    """The reports of the 4-device workers, merged, and the output folder."""
    finished(workers, *DEVICE_WORKERS)
    out = workers[1]
    reports = {}
    for name in DEVICE_WORKERS:
        with open(out / f"{name}.json") as f:
            reports[name] = json.load(f)
    report = {
        "errors": reports["steps"]["errors"],
        "steps": {**reports["steps"]["steps"], **reports["runs"]["steps"]},
        "runs": reports["runs"]["runs"],
    }
    return report, out


def load_params(path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return dict(f)


def assert_same_params(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
    assert worst <= atol, f"parameters differ by up to {worst:.3g} (tolerance {atol:.3g})"


def assert_same_metrics(a: list[dict], b: list[dict], rtol: float = 1e-9) -> None:
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for ma, mb in zip(a, b, strict=True):
        for key in ("train_loss", "train_energy_loss", "train_force_loss", "train_hessian_loss", "val_loss"):
            np.testing.assert_allclose(ma[key], mb[key], rtol=rtol, err_msg=f"epoch {ma['epoch']} {key}")


def test_uneven_split_and_missing_devices_are_refused(single):
    errors = single[0]["errors"]
    assert "--batch-size 6 does not split evenly over 4 devices" in errors["uneven"]
    assert "--devices 5: this process has 4 local device(s)" in errors["too_many"]


@pytest.mark.parametrize("n_devices", [2, 4])
@pytest.mark.parametrize("probe", SCHEMES)
def test_sharded_step_equals_single_device_step(single, probe, n_devices):
    """Two steps (a full global batch of 8, then the last batch of 6, which leaves devices with
    fewer or no molecules) agree with `make_train_step` on one device, in float64."""
    r = single[0]["steps"][f"{probe}/{n_devices}"]
    assert r["update"] > 1e-4  # the steps move the parameters: a real comparison
    for k in (1, 2):
        # Adam takes ~lr-sized steps; a mis-reduced gradient (summed twice, or not at all) moved
        # parameters by ~1e-5 here, float64 rounding by ~1e-17
        assert r[f"params_{k}"] <= 1e-8 * r["update"], (k, r)
        assert r[f"metrics_{k}"] <= 1e-10 * r[f"loss_{k}"], (k, r)


def test_short_run_does_not_depend_on_device_count(single):
    """`train()` for 2 epochs (6 steps, shuffled, with validation) with --devices 1, 2 and 0 (= 4)."""
    report, out = single
    runs = report["runs"]
    assert {d: runs[d]["n_devices"] for d in runs} == {"1": 1, "2": 2, "0": 4}
    reference = load_params(out / "params_devices1.npz")
    for devices in ("2", "0"):
        assert_same_params(load_params(out / f"params_devices{devices}.npz"), reference, atol=1e-9)
        assert_same_metrics(runs[devices]["metrics"], runs["1"]["metrics"])


def test_two_processes_agree_with_one(workers, single):
    """Two processes x 2 devices joined by jax.distributed (rank 0 by flags, rank 1 by JAX_*
    variables) train the run of `--devices 1`: same parameters, metrics written once."""
    finished(workers, "process0", "process1")
    out = workers[1]
    reports = []
    for rank in (0, 1):
        with open(out / f"process{rank}.json") as f:
            reports.append(json.load(f))
    assert [r["process_count"] for r in reports] == [2, 2]
    assert [r["n_devices"] for r in reports] == [4, 4]
    assert [r["local_slots"] for r in reports] == [[0, 1], [2, 3]]  # each process built only its half
    with open(out / "run_processes" / "metrics.jsonl") as f:
        assert len(f.read().splitlines()) == 2  # one line per epoch: only process 0 writes

    report = single[0]
    assert_same_params(load_params(out / "params_processes.npz"), load_params(out / "params_devices1.npz"), 1e-9)
    for r in reports:
        assert_same_metrics(r["metrics"], report["runs"]["1"]["metrics"])
