"""Running the study: one process trains the grid's cells in priority order, resumably, under locks;
`status` reports the grid with an ETA from measured epoch times; `reevaluate` brings finished
cells' test errors up to date with `phljax.evaluation`."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import socket
import time
import traceback
from collections.abc import Callable, Sequence

import numpy as np

from phljax import data as phdata
from phljax.config import Config
from phljax.evaluation import evaluate_molecules, in_kcal_mol, test_subsets
from phljax.files import write_atomic
from phljax.potential import Potential
from phljax.study.grid import (
    FAILED,
    LOCK,
    PROTOCOLS,
    STOP,
    Cell,
    Study,
    _load_settings,
    cell_config,
    cell_metrics,
    cell_results,
    dataset_reactions,
    open_study,
    reaction_folds,
)  # fmt: skip
from phljax.train import train
from phljax.train.loop import prepare


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _lock_info(workdir: str) -> tuple[dict | None, bool]:
    """(the lock's contents or None, whether the lock is stale). A lock is stale when its pid is dead
    on this host; an unreadable one (being written) when it is over a minute old."""
    path = os.path.join(workdir, LOCK)
    try:
        with open(path) as f:
            info = json.load(f)
    except FileNotFoundError:
        return None, False
    except (OSError, ValueError):
        with contextlib.suppress(FileNotFoundError):
            return {}, time.time() - os.path.getmtime(path) > 60
        return None, False
    return info, info.get("host") == socket.gethostname() and not _pid_alive(int(info.get("pid", -1)))


def acquire_lock(workdir: str) -> bool:
    """Create `<workdir>/study.lock` (pid, host, start time); replace a stale one. False if held.

    Creation is atomic (O_EXCL); two processes replacing the same stale lock at the same moment
    could both succeed (the lock is re-read before it is removed, which narrows that window)."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            info, stale = _lock_info(workdir)
            if info is not None and not stale:
                return False
            if info is not None and _lock_info(workdir)[0] == info:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
            continue
        now = time.time()
        start = datetime.datetime.fromtimestamp(now).astimezone().isoformat(timespec="seconds")
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(), "start": start, "start_unix": now}, f)
        return True
    return False


def release_lock(workdir: str) -> None:
    """Remove `<workdir>/study.lock` if this process holds it."""
    info, _ = _lock_info(workdir)
    if info and info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(workdir, LOCK))


def _done(workdir: str) -> bool:
    return os.path.exists(os.path.join(workdir, "results.json"))


def run_study(
    root: str,
    base: Config,
    study: Study = Study(),  # noqa: B008 (frozen)
    *,
    train_fn: Callable[[Config], dict] = train,
    keep_going: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, list[str]]:
    """Run the study's cells in priority order (`Study.cells`), resumably.

    A cell whose results.json exists is done and skipped; one locked by a live process is skipped;
    any other is trained (train resumes from the cell's checkpoints) under its lock. `<root>/STOP`
    stops the study before the next cell.

    Args:
        root: study root directory.
        base: base config (epochs cap, model, batch, data, ...); the cells set OWNED_FIELDS and workdir.
        study: the grid.
        train_fn: `train(config) -> results` (tests substitute a counting wrapper).
        keep_going: record a failing cell in `<cell>/study_failed.json` and go on (default: raise).
        log: progress messages.

    Returns:
        {"trained" | "done" | "running" | "failed" | "left": [cell paths relative to root]}.
    """
    folds = ()
    if "reactions" in study.protocols:
        folds = reaction_folds(dataset_reactions(list(base.data) or phdata.default_data()), study.n_folds)
    settings = open_study(root, base, study, folds)
    folds = settings["folds"] or ()
    jobs = [
        Job(
            os.path.join(cell.protocol, cell.name),
            cell.workdir(root),
            lambda cell=cell: train_fn(cell_config(cell, base, root, n_folds=study.n_folds, folds=folds)),
        )
        for cell in study.cells()
    ]
    return run_cells(root, jobs, keep_going=keep_going, log=log)


@dataclasses.dataclass(frozen=True)
class Job:
    """One cell for `run_cells`: its path relative to the root, its work directory, and the call
    that makes it (train, or train then evaluate); done = `is_done(workdir)`."""

    rel: str
    workdir: str
    make: Callable[[], object]
    is_done: Callable[[str], bool] = _done


def run_cells(
    root: str, jobs: Sequence[Job], *, keep_going: bool = False, log: Callable[[str], None] = print
) -> dict[str, list[str]]:
    """Make each job not done yet, in order, under its work directory's lock; `<root>/STOP` stops
    before the next. A failing job raises, or with `keep_going` is recorded in
    `<workdir>/study_failed.json` and skipped. Returns {"trained" | "done" | "running" | "failed" |
    "left": [rel paths]}."""
    outcome = {k: [] for k in ("trained", "done", "running", "failed", "left")}
    for i, job in enumerate(jobs):
        if os.path.exists(os.path.join(root, STOP)):
            outcome["left"] += [j.rel for j in jobs[i:] if not j.is_done(j.workdir)]
            log(f"{os.path.join(root, STOP)} found: stopping, {len(outcome['left'])} cells left")
            break
        if job.is_done(job.workdir):
            outcome["done"].append(job.rel)
            continue
        if not acquire_lock(job.workdir):
            outcome["running"].append(job.rel)
            log(f"[{i + 1}/{len(jobs)}] {job.rel}: locked by {_lock_info(job.workdir)[0]}, skipped")
            continue
        if job.is_done(job.workdir):  # another process finished it between the check above and the lock
            release_lock(job.workdir)
            outcome["done"].append(job.rel)
            continue
        try:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(job.workdir, FAILED))
            epochs = len(cell_metrics(job.workdir))
            log(f"[{i + 1}/{len(jobs)}] {job.rel}: " + (f"resuming after epoch {epochs}" if epochs else "training"))
            job.make()
            outcome["trained"].append(job.rel)
        except Exception as e:
            if not keep_going:
                raise
            with open(os.path.join(job.workdir, FAILED), "w") as f:
                json.dump({"error": repr(e), "traceback": traceback.format_exc(), "time": time.time()}, f, indent=2)
            outcome["failed"].append(job.rel)
            log(f"[{i + 1}/{len(jobs)}] {job.rel}: failed ({e!r}), going on")
        finally:
            release_lock(job.workdir)
    return outcome


@dataclasses.dataclass(frozen=True)
class CellStatus:
    """Progress of one cell."""

    cell: Cell
    state: str  # done | running | failed | left
    epochs: int  # epochs trained so far
    epoch_time_s: float | None  # median epoch time of the cell's scheme (s; None: none measured)
    expected_epochs: float  # epochs the cell is expected to take in all
    eta_s: float | None  # seconds left for this cell (0 when done; None: no epoch time measured)


def _median(values: Sequence[float]) -> float | None:
    return float(np.median(values)) if len(values) else None


def status(root: str) -> list[CellStatus]:
    """The state of every cell of the study's (stored) grid, in run order, with an ETA.

    ETA of a cell not done = (expected epochs - epochs trained) x epoch time, where the epoch time
    is the median `epoch_time_s` of the started runs of the same scheme key (same protocol, else any
    protocol; first epochs, which compile, left out when a run has more), and the expected epochs
    are the median epochs used by the finished runs of that key (same fallback), else the cap.
    """
    settings = _load_settings(root)
    grid = settings["grid"]
    study = Study(
        tuple(grid["protocols"]), tuple(grid["probes"]), tuple(grid["regimes"]), grid["seeds"], settings["n_folds"]
    )
    cap = settings["base"].get("epochs", Config().epochs)
    cells = study.cells()
    info = {}
    for cell in cells:
        workdir = cell.workdir(root)
        times = [line["epoch_time_s"] for line in cell_metrics(workdir) if "epoch_time_s" in line]
        results = cell_results(workdir)
        epochs = results.get("epochs_run", len(times)) if results else len(times)
        info[cell] = (workdir, results, epochs, times[1:] or times)

    def pooled(cell: Cell, what: str) -> float | None:
        for same in (lambda c: c.protocol == cell.protocol and c.key == cell.key, lambda c: c.key == cell.key):
            if what == "time":
                values = [t for c in cells if same(c) for t in info[c][3]]
            else:
                values = [info[c][2] for c in cells if same(c) and info[c][1] is not None]
            if values:
                return _median(values)
        return None

    rows = []
    for cell in cells:
        workdir, results, epochs, _ = info[cell]
        lock, stale = _lock_info(workdir)
        if results is not None:
            state = "done"
        elif lock is not None and not stale:
            state = "running"
        elif os.path.exists(os.path.join(workdir, FAILED)):
            state = "failed"
        else:
            state = "left"
        epoch_time = pooled(cell, "time")
        expected = float(epochs) if results is not None else (pooled(cell, "epochs") or cap)
        eta = 0.0 if results is not None else None if epoch_time is None else max(expected - epochs, 0) * epoch_time
        rows.append(CellStatus(cell, state, epochs, epoch_time, expected, eta))
    return rows


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def format_status(rows: Sequence[CellStatus]) -> str:
    """A Markdown table of `status(root)` and a summary line with the ETA of what is left."""
    lines = ["| protocol | cell | state | epochs | epoch (s) | ETA |", "|---|---|---|---|---|---|"]
    for r in rows:
        t = "–" if r.epoch_time_s is None else f"{r.epoch_time_s:.3g}"
        eta = "–" if r.state == "done" else "?" if r.eta_s is None else _duration(r.eta_s)
        lines.append(f"| {r.cell.protocol} | {r.cell.name} | {r.state} | {r.epochs} | {t} | {eta} |")
    counts = {s: sum(r.state == s for r in rows) for s in ("done", "running", "failed", "left")}
    pending = [r for r in rows if r.state != "done"]
    unknown = sum(r.eta_s is None for r in pending)
    summary = f"{counts['done']}/{len(rows)} done, {counts['running']} running, {counts['failed']} failed, "
    summary += f"{counts['left']} left; ETA of what is left (one process): "
    summary += _duration(sum(r.eta_s or 0.0 for r in pending))
    if unknown:
        summary += f" + {unknown} cells of schemes with no measured epoch time"
    return "\n".join([*lines, "", *_complete_seeds(rows), summary])


def _complete_seeds(rows: Sequence[CellStatus]) -> list[str]:
    """Per protocol: the seeds whose every cell is done, e.g. 'random: all 6 cells done for seeds 0, 1, 2 (3 of 4)'."""
    out = []
    for protocol in dict.fromkeys(r.cell.protocol for r in rows):
        seeds: dict[int, bool] = {}
        for r in rows:
            if r.cell.protocol == protocol:
                seeds[r.cell.seed] = seeds.get(r.cell.seed, True) and r.state == "done"
        done = sorted(s for s, ok in seeds.items() if ok)
        cells = len({r.cell.key for r in rows if r.cell.protocol == protocol})
        listed = ", ".join(map(str, done)) if done else "none"
        out.append(f"{protocol}: all {cells} cells done for seeds {listed} ({len(done)} of {len(seeds)})")
    return [*out, ""] if out else []


#: results.json keys a current evaluation writes (test subsets: energy_rel_*; top level: the rest)
_CURRENT_TEST_KEYS = ("energy_rel_rmse",)
_CURRENT_TOP_KEYS = ("unidentified_formulas",)
_CHECKED = ("energy_rmse", "forces_rmse")  # kept values a re-evaluation must reproduce


def _is_current(results: dict) -> bool:
    test = results.get("errors_ev", {}).get("test", {})
    return all(k in test for k in _CURRENT_TEST_KEYS) and all(k in results for k in _CURRENT_TOP_KEYS)


def reevaluate(
    root: str,
    protocols: Sequence[str] = tuple(PROTOCOLS),
    *,
    rtol: float = 1e-3,
    atol: float = 2e-3,
    log: Callable[[str], None] = print,
) -> list[str]:
    """Add the metrics newer evaluations report to finished cells that lack them.

    Each such cell's best checkpoint is evaluated again on its own test split (rebuilt from its
    config: same data, seed and protocol) with `phljax.evaluation.evaluate_molecules`; metrics its
    `results.json` lacks (per-formula relative energies, `energy_rel_*`; the formulas whose total
    energy the training compositions do not fix, `unidentified_formulas`) are added, those it has
    are kept as they were. A cell in flight (study.lock held) is left alone.

    Raises:
        ValueError: when a kept energy or force RMSE is not reproduced to `rtol` and `atol` (eV,
            eV/A: a float32 total energy of 1e3-1e4 eV resolves ~1e-3 eV, and other batches sum in
            another order), i.e. the checkpoint or the split is not the one that was evaluated;
            names the cell.

    Returns:
        The cells updated, as `<protocol>/<cell>` paths relative to `root`.
    """
    updated = []
    for protocol in protocols:
        folder = os.path.join(root, protocol)
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            cell = Cell.parse(protocol, name)
            workdir = os.path.join(folder, name)
            results = cell_results(workdir) if cell else None
            if results is None or _is_current(results) or not acquire_lock(workdir):
                continue
            try:
                config = Config.from_json(json.dumps(results["config"]))
                run = prepare(config)
                errors = evaluate_molecules(Potential.from_workdir(workdir), test_subsets(run.subset("test"), "test"))
                old = results["errors_ev"]
                for subset, new in errors.items():
                    kept = old.setdefault(subset, {})
                    for k in _CHECKED:
                        if k in kept and not np.isclose(new[k], kept[k], rtol=rtol, atol=atol):
                            raise ValueError(
                                f"{workdir}: re-evaluated {subset} {k} {new[k]:.6g} eV-based, results.json has "
                                f"{kept[k]:.6g}: not the checkpoint or split that was evaluated"
                            )
                    for k, v in new.items():
                        kept.setdefault(k, v)
                results["errors_kcal_mol"] = in_kcal_mol(old)
                results["unidentified_formulas"] = run.unidentified_formulas()
                write_atomic(os.path.join(workdir, "results.json"), json.dumps(results, indent=2))
            finally:
                release_lock(workdir)
            updated.append(os.path.join(protocol, name))
            unidentified = results["unidentified_formulas"]
            log(f"{updated[-1]}: re-evaluated; energies not fixed by training: {unidentified or 'none'}")
    return updated
