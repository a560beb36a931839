"""Multi-device and multi-process checks for tests/test_parallel.py, each run in a process of its own.

JAX fixes its device count when its backend starts, so tests/test_parallel.py launches this script
with `XLA_FLAGS=--xla_force_host_platform_device_count=N` (N = 4, or 2 per process) and reads the
JSON it writes:

    python tests/parallel_worker.py devices DATA.h5 OUTDIR NAME [--schemes none,full] [--runs]
    python tests/parallel_worker.py process DATA.h5 OUTDIR PORT RANK

`devices` (one process, 4 devices) checks that a too-large or uneven `--devices` is refused; with
--schemes, that one and two sharded steps on 2 and 4 devices equal the plain single-device step on
the same global batches; with --runs, trains `train()` for 2 epochs with --devices 1, 2 and 0 (= 4).
`process` trains the same run as one of two processes joined by `jax.distributed` on localhost
(rank 0 configured by flags, rank 1 by the JAX_* environment variables), 2 devices each.
Everything runs in float64. Final parameters go to OUTDIR/params_*.npz, the numbers the test
checks to OUTDIR/NAME.json (devices) or OUTDIR/process<RANK>.json.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

jax.config.update("jax_enable_x64", True)  # before any array exists: the whole worker runs in float64

import phljax  # noqa: E402
from phljax import data as phdata  # noqa: E402
from phljax import distributed  # noqa: E402
from phljax.checkpoint import Checkpointer  # noqa: E402
from phljax.models import init_params  # noqa: E402
from phljax.train.loop import Run, split_batches  # noqa: E402
from phljax.train.sharded import data_parallel_steps  # noqa: E402
from phljax.train.step import TrainState, make_train_step  # noqa: E402

TINY = {"channels": 4, "lmax": 1, "num_layers": 1}
SCHEMES = ("none", "onehot", "random", "full")
STEP_BATCHES = (0, 2)  # of the first unshuffled epoch: a full global batch, then the last, partial one


def base_config(data: str, **changes) -> phljax.Config:
    """The run every check shares: 24 molecules -> 22 train (batches of 8, 8, 6), 2 val, 0 test."""
    fields = dict(
        data=(data,), batch_size=8, epochs=2, val_fraction=0.1, test_fraction=0.0, x64=True, progress=False, **TINY
    )
    return phljax.Config(**{**fields, **changes})


def flat(tree) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(float(np.max(np.abs(a[k] - b[k]))) if a[k].size else 0.0 for k in a)


def final_params(workdir: str) -> dict[str, np.ndarray]:
    """Parameters of the latest checkpoint, restored without a target."""
    ckpt = Checkpointer(workdir)
    step = ckpt.latest.latest_step()
    state = ckpt.latest.restore(step, args=ocp.args.StandardRestore())
    ckpt.close()
    return flat(state["state"]["params"])


def check_errors(molecules) -> dict[str, str]:
    """The messages of refused device counts (empty string: not refused)."""
    out = {}
    for name, changes in {"uneven": dict(batch_size=6, devices=4), "too_many": dict(devices=5)}.items():
        try:
            phljax.prepare(base_config("unused", **changes), molecules)
            out[name] = ""
        except ValueError as e:
            out[name] = str(e)
    return out


def initial_state(run: Run, optimizer, params=None) -> TrainState:
    """The state `phljax.train` starts from (same values and dtypes, so the same compiled step)."""
    seed = run.config.seed
    if params is None:
        first = phdata.make_batch(run.subset("train")[: run.budget.n_graphs - 1], run.budget, run.config.cutoff,
                                  dtype=run.dtype)  # fmt: skip
        params = init_params(run.model, first, jax.random.PRNGKey(seed))
    return TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32), jax.random.PRNGKey(seed + 1))


def check_steps(molecules, schemes) -> dict:
    """Per scheme and device count n: max |difference| of the parameters and metrics after one and
    two sharded steps from the plain single-device step (`make_train_step`, no mesh) on the same
    global batches, with the size of the parameter update and the losses for scale."""
    results = {}
    monitor = jnp.asarray(1e30, jnp.float64)
    params = None  # the model does not depend on the scheme: initialise once
    for probe in schemes:
        config = base_config("unused", probe=probe, devices=1)
        run1 = phljax.prepare(config, molecules)
        optimizer = run1.optimizer()
        state0 = initial_state(run1, optimizer, params)
        params = state0.params
        batches = list(split_batches(run1, "train"))  # unshuffled, stacked [1, ...]
        single = jax.jit(make_train_step(run1.energy_fn, run1.loss_config, optimizer))
        state, reference = state0, []
        for i in STEP_BATCHES:
            state, metrics = single(state, jax.tree.map(lambda x: x[0], batches[i]), monitor)
            reference.append((flat(state.params), flat(metrics)))
        update = max_diff(reference[-1][0], flat(state0.params))
        for n in (2, 4):
            run = phljax.prepare(config.replace(devices=n), molecules)
            assert run.n_devices == n and list(distributed.local_slots(n)) == list(range(n))
            train_step, _, put = data_parallel_steps(
                run.energy_fn, run.loss_config, optimizer, n, val_key=jax.random.PRNGKey(config.seed + 2)
            )
            sub = list(split_batches(run, "train"))
            state = put(state0)
            out = {"update": update}
            for k, (i, (ref_params, ref_metrics)) in enumerate(zip(STEP_BATCHES, reference, strict=True)):
                assert jax.tree.leaves(sub[i])[0].shape[0] == n
                state, metrics = train_step(state, sub[i], monitor)
                out[f"params_{k + 1}"] = max_diff(flat(state.params), ref_params)
                out[f"metrics_{k + 1}"] = max_diff(flat(metrics), ref_metrics)
                out[f"loss_{k + 1}"] = float(ref_metrics["['loss']"])
            results[f"{probe}/{n}"] = out
            print(probe, n, out, flush=True)
    return results


def train_and_dump(config: phljax.Config, outdir: str, name: str) -> dict:
    t0 = time.perf_counter()
    run = phljax.prepare(config)
    phljax.train(config, run)
    params = final_params(config.workdir)  # every process: orbax restores collectively
    if distributed.is_main_process():
        np.savez(os.path.join(outdir, f"{name}.npz"), **params)
    with open(os.path.join(config.workdir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    return {
        "n_devices": run.n_devices,
        "local_slots": list(distributed.local_slots(run.n_devices)),
        "process_count": jax.process_count(),
        "metrics": [{k: v for k, v in line.items() if "time" not in k} for line in lines],
        "seconds": time.perf_counter() - t0,
    }


def devices_main(data: str, outdir: str, name: str, *options: str) -> None:
    assert jax.local_device_count() == 4, "run with XLA_FLAGS=--xla_force_host_platform_device_count=4"
    molecules = phljax.data.load([data])
    report = {"errors": check_errors(molecules)}
    if "--schemes" in options:
        schemes = options[options.index("--schemes") + 1].split(",")
        assert set(schemes) <= set(SCHEMES), schemes
        t0 = time.perf_counter()
        report["steps"] = check_steps(molecules, schemes)
        report["steps_seconds"] = time.perf_counter() - t0
    if "--runs" in options:
        report["runs"] = {}
        for devices in (1, 2, 0):
            config = base_config(data, devices=devices, workdir=os.path.join(outdir, f"run_devices{devices}"))
            report["runs"][str(devices)] = train_and_dump(config, outdir, f"params_devices{devices}")
            print("run", devices, report["runs"][str(devices)]["seconds"], flush=True)
    with open(os.path.join(outdir, f"{name}.json"), "w") as f:
        json.dump(report, f, indent=2)


def process_main(data: str, outdir: str, port: str, rank: str) -> None:
    address, rank = f"localhost:{port}", int(rank)
    if rank == 0:  # flags
        config = base_config(data, coordinator_address=address, num_processes=2, process_id=0)
    else:  # the usual environment variables
        os.environ.update(JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(rank))
        config = base_config(data)
    config = config.replace(workdir=os.path.join(outdir, "run_processes"))
    distributed.initialize(config.coordinator_address, config.num_processes, config.process_id)  # the entry point's job
    report = train_and_dump(config, outdir, "params_processes")
    with open(os.path.join(outdir, f"process{rank}.json"), "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    {"devices": devices_main, "process": process_main}[mode](*args)
