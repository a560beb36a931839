"""Faults a long run must survive: kill -9 at any moment, damaged checkpoints, non-finite labels.

- A training subprocess killed with SIGKILL at random moments (a fixed seed; some kills land in
  a checkpoint write) and resumed each time ends with the results of an uninterrupted run, and
  metrics.jsonl holds each epoch once.
- A damaged newest checkpoint (truncated array file, deleted metadata, garbage bytes) falls back
  to the one before with a warning naming what was wrong; all damaged stops with a message.
- A NaN label is skipped, counted in metrics.jsonl, never saved; NaN everywhere stops the run.
- Processes that read, change and write back one settings file under `phljax.files.locked` lose
  none of each other's changes; a holder killed with SIGKILL frees the lock.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from conftest import REPO, SUBPROCESS_ENV, cli_args

import phljax
from phljax.checkpoint import Checkpointer, CheckpointError
from phljax.files import locked
from phljax.train.loop import initial_record

KILLS = 4  # SIGKILLs per fault-injection run


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _cmd(h5_path, workdir, epochs):
    return [sys.executable, os.path.join(REPO, "experiments", "run.py"),
            *cli_args(["--probe=random"], h5_path, workdir, epochs=epochs)]  # fmt: skip


def _without_times(lines):
    return [{k: v for k, v in line.items() if "time" not in k} for line in lines]


def _epochs_logged(workdir) -> int:
    try:
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            return sum(1 for line in f if line.strip())
    except FileNotFoundError:
        return 0


def test_kill_9_anywhere_then_resume_equals_an_uninterrupted_run(h5_path, tmp_path):
    """Each attempt is killed a random 0-0.4 s after it logs a new epoch: inside the next epoch,
    between the metrics line and the checkpoint, or during the checkpoint write."""
    epochs = 6
    straight = str(tmp_path / "straight")
    subprocess.run(_cmd(h5_path, straight, epochs), cwd=REPO, env=SUBPROCESS_ENV, check=True, capture_output=True)

    killed = str(tmp_path / "killed")
    rng = np.random.default_rng(7)
    kills = 0
    while kills < KILLS:
        before = _epochs_logged(killed)
        proc = subprocess.Popen(_cmd(h5_path, killed, epochs), cwd=REPO, env=SUBPROCESS_ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
        deadline = time.monotonic() + 300
        while proc.poll() is None and _epochs_logged(killed) <= before and time.monotonic() < deadline:
            time.sleep(0.02)
        if proc.poll() is not None:  # finished before a kill could land
            assert proc.returncode == 0, proc.stderr.read().decode()[-3000:]
            break
        time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    proc = subprocess.run(_cmd(h5_path, killed, epochs), cwd=REPO, env=SUBPROCESS_ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert kills >= 2, f"only {kills} kills landed"

    lines = _metrics(killed)
    assert [m["epoch"] for m in lines] == list(range(1, epochs + 1))  # each epoch exactly once
    assert _without_times(lines) == _without_times(_metrics(straight))
    with open(os.path.join(straight, "results.json")) as f:
        reference = json.load(f)
    with open(os.path.join(killed, "results.json")) as f:
        resumed = json.load(f)
    assert resumed["errors_ev"] == reference["errors_ev"]


def _damage(step_dir: str, how: str) -> None:
    default = os.path.join(step_dir, "default")
    if how == "truncated_array":
        data = os.path.join(default, "d")  # the array data orbax reads (ocdbt.process_*/ hold per-process copies)
        biggest = max((os.path.join(data, f) for f in os.listdir(data)), key=os.path.getsize)
        with open(biggest, "r+b") as f:
            f.truncate(os.path.getsize(biggest) // 2)
    elif how == "deleted_metadata":
        os.remove(os.path.join(default, "_METADATA"))
    elif how == "garbage":
        for r, _, fs in os.walk(default):
            for f in fs:
                path = os.path.join(r, f)
                size = max(os.path.getsize(path), 64)
                with open(path, "wb") as out:
                    out.write(np.random.default_rng(0).bytes(size))
    else:
        raise ValueError(how)


@pytest.mark.parametrize("how", ["truncated_array", "deleted_metadata", "garbage"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(trained, run, tmp_path, how):
    config, _, _, _ = trained
    workdir = str(tmp_path / "run")
    shutil.copytree(config.workdir, workdir)
    latest = os.path.join(workdir, "checkpoints", "latest")
    assert sorted(os.listdir(latest)) == ["1", "2"]  # two states kept
    _damage(os.path.join(latest, "2"), how)

    template = initial_record(run, run.optimizer())
    ckpt = Checkpointer(workdir)
    with pytest.warns(RuntimeWarning, match=r"fell back to step 1; step 2: "):
        record = ckpt.restore_latest(template)
    ckpt.close()
    assert int(record["epoch"]) == 1

    resumed = config.replace(workdir=workdir, epochs=3)  # goes on from epoch 1: redoes 2, then 3
    with pytest.warns(RuntimeWarning, match="fell back to step 1"):
        phljax.train(resumed, phljax.prepare(resumed))
    assert [m["epoch"] for m in _metrics(workdir)] == [1, 2, 3]
    logged_at_end = ("val_energy_rmse", "val_energy_rel_rmse", "val_forces_rmse", "val_hessian_rmse")  # at the end
    same = [{k: v for k, v in m.items() if k not in logged_at_end} for m in _without_times(_metrics(workdir))[:2]]
    assert same == [
        {k: v for k, v in m.items() if k not in logged_at_end} for m in _without_times(_metrics(config.workdir))
    ]


def test_all_checkpoints_damaged_stops_with_a_message(trained, run, tmp_path):
    config, _, _, _ = trained
    workdir = str(tmp_path / "run")
    shutil.copytree(config.workdir, workdir)
    for manager in ("latest", "best"):
        folder = os.path.join(workdir, "checkpoints", manager)
        for step in os.listdir(folder):
            _damage(os.path.join(folder, step), "garbage")
    with pytest.raises(CheckpointError, match="no usable checkpoint among steps .* move .* away"):
        phljax.train(config.replace(workdir=workdir, epochs=3), run)
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        phljax.Potential.from_workdir(workdir)


def _poisoned(molecules, indices):
    out = []
    for i, m in enumerate(molecules):
        if i in indices:
            m = dataclasses.replace(m)
            forces = m.forces.copy()
            forces[0, 0] = np.nan
            object.__setattr__(m, "forces", forces)  # past the record's own check: "slipped past a reader"
        out.append(m)
    return out


def test_a_nan_label_is_skipped_counted_and_never_saved(tiny_config, molecules, tmp_path):
    config = tiny_config.replace(workdir=str(tmp_path / "nan"), epochs=2, val_fraction=0.0, test_fraction=0.0)
    run = phljax.prepare(config, _poisoned(molecules, {5}))
    results = phljax.train(config, run)
    lines = _metrics(config.workdir)
    assert [m["nonfinite_steps"] for m in lines] == [1, 1]  # the one batch holding the molecule, each epoch
    assert all(np.isfinite(m["train_loss"]) for m in lines)
    params = phljax.Checkpointer(config.workdir).best_params()
    assert all(np.all(np.isfinite(np.asarray(p))) for p in jax.tree.leaves(params))
    assert results["epochs_run"] == 2


def test_nan_everywhere_stops_after_a_bounded_number_of_steps(tiny_config, molecules, tmp_path):
    config = tiny_config.replace(workdir=str(tmp_path / "nan_all"), epochs=3, max_nonfinite_steps=2)
    run = phljax.prepare(config, _poisoned(molecules, set(range(len(molecules)))))
    with pytest.raises(FloatingPointError, match=r"updates had non-finite gradients and were skipped"):
        phljax.train(config, run)
    assert not os.path.exists(os.path.join(config.workdir, "checkpoints", "latest", "1"))  # nothing saved


def test_a_full_disk_at_a_save_stops_the_run_and_keeps_the_previous_checkpoint(tiny_config, run, tmp_path,
                                                                               monkeypatch):  # fmt: skip
    """ENOSPC at epoch 2's checkpoint write (orbax's own save raising it, as on a full disk): the run
    stops with a message that says what to do, and epoch 1's checkpoint still restores."""
    import errno

    import orbax.checkpoint as ocp

    config = tiny_config.replace(workdir=str(tmp_path / "full"), epochs=3)
    original = ocp.CheckpointManager.save

    def save(self, step, *args, **kwargs):
        if step >= 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    with pytest.raises(
        CheckpointError, match=r"epoch 2: saving .* \(No space left on device\).* \(epoch 1\) is intact"
    ):
        phljax.train(config, run)
    monkeypatch.setattr(ocp.CheckpointManager, "save", original)
    ckpt = Checkpointer(config.workdir)
    assert int(ckpt.restore_latest(initial_record(run, run.optimizer()))["epoch"]) == 1
    ckpt.close()


def test_an_unwritable_work_directory_fails_before_training(tiny_config, run, tmp_path):
    """A work directory that cannot be created (here: a path through a file; read-only and full
    file systems fail the same call) stops the run before any training, naming the directory."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    config = tiny_config.replace(workdir=str(blocker / "run"))
    with pytest.raises(OSError, match="cannot write the work directory"):
        phljax.train(config, run)


_INCREMENT = """
import json, sys
from phljax.files import locked, write_atomic
path, n = sys.argv[1], int(sys.argv[2])
for _ in range(n):
    with locked(path):
        with open(path) as f:
            count = json.load(f)["count"]
        write_atomic(path, json.dumps({"count": count + 1}))
"""


def test_locked_read_modify_writes_from_two_processes_lose_nothing(tmp_path):
    path = str(tmp_path / "settings.json")
    with open(path, "w") as f:
        json.dump({"count": 0}, f)
    procs = [subprocess.Popen([sys.executable, "-c", _INCREMENT, path, "300"], env=SUBPROCESS_ENV) for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    with open(path) as f:
        assert json.load(f)["count"] == 600


_HOLD = """
import sys, time
from phljax.files import locked
with locked(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_lock_holder_killed_with_sigkill_frees_the_lock(tmp_path):
    path = str(tmp_path / "settings.json")
    child = subprocess.Popen([sys.executable, "-c", _HOLD, path], stdout=subprocess.PIPE, text=True, env=SUBPROCESS_ENV)
    try:
        assert child.stdout.readline().strip() == "held"
        got = threading.Event()

        def take():
            with locked(path):
                got.set()

        waiter = threading.Thread(target=take, daemon=True)
        waiter.start()
        assert not got.wait(0.5)  # the child holds it
        child.send_signal(signal.SIGKILL)
        assert got.wait(30)
    finally:
        child.kill()
        child.wait()
