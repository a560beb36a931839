"""The run: every reaction's work in order, resumable; the assembled HDF5 files and the summary."""

from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import glob
import json
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from logging.handlers import QueueHandler, QueueListener
from typing import Any, NamedTuple

import numpy as np
from tqdm import tqdm

from phljax import units
from phljax.data import write_h5
from phljax.datagen.cache import load_json, load_npz, save_json
from phljax.datagen.labels import rejection, to_molecules
from phljax.datagen.reactions.checks import NotAMinimumError, verify_minimum
from phljax.datagen.reactions.labelling import (
    STATIONARY,
    ReactionDir,
    data_extra,
    hessian_record,
    label_point,
    nms_samples,
    stationary_hessian,
)
from phljax.datagen.reactions.spec import ACCEPTANCE, Reaction, ReactionConfig
from phljax.datagen.reactions.structure import irc_points, irc_stage, optimize_stage, ts_stage

log = logging.getLogger("phljax.datagen")

CATEGORIES = ("rtp", "irc", "nms")
#: cache file names of labelled data geometries, per category (helper Hessians are hess_*.npz)
_PATTERNS = {"rtp": "rtp_*.npz", "irc": "irc_*_[0-9][0-9].npz", "nms": "nms_*_[0-9][0-9][0-9].npz"}


class Task(NamedTuple):
    """One unit of work of :func:`run`."""

    description: str
    reaction: str  # reaction id
    structure: bool  # a link of the reaction's structure chain (runs after the links before it);
    # otherwise a label task, which needs the whole chain and nothing else
    run: Callable[[], Any]


def tasks(
    cfg: ReactionConfig, reactions: Sequence[Reaction], cache_dir: str, rounds: tuple[int, int] | None = None
) -> Iterator[Task]:
    """The work as a fixed, ordered list of :class:`Task` (the same for the same arguments).

    Order: the structure work of one reaction after another (optimise reactant and product,
    their Hessians, TS, IRC), so each finished reaction is complete and verified early; then
    the labels in rounds: round k labels, for every reaction, IRC point k of both branches and
    NMS sample k around reactant, product and TS, so a partial cache covers every reaction and
    every category. A thunk whose prerequisite failed does nothing.

    ``rounds=(first, last)`` keeps only label rounds ``first..last`` (1-based, inclusive; the
    structure work is always included): machines that share out one job label disjoint rounds
    into caches that are merged by copying their files.
    """
    first, last = rounds or (1, max(cfg.n_irc, cfg.n_nms))
    stages = [ReactionDir(cache_dir, r) for r in reactions]
    for st in stages:
        rid = st.rxn.id
        for role in ("reactant", "product"):
            yield Task(f"{rid}: optimise {role}", rid, True, lambda st=st, role=role: optimize_stage(cfg, st, role))
        for role in ("reactant", "product"):

            def run_label(st=st, role=role):
                opt = optimize_stage(cfg, st, role)
                if opt is None or st.failed(f"{role}_minimum"):  # a saddle's labels are not redone
                    return
                rec = stationary_hessian(cfg, st, role, opt["positions"])
                if rec is not None:
                    check_minimum(cfg, st, role, rec)

            yield Task(f"{rid}: label {role}", rid, True, run_label)

        def run_ts(st=st):
            if all(
                optimize_stage(cfg, st, r) is not None and not st.failed(f"{r}_minimum")
                for r in ("reactant", "product")
            ):
                ts_stage(cfg, st)

        yield Task(f"{rid}: transition state", rid, True, run_ts)
        yield Task(f"{rid}: IRC", rid, True, lambda st=st: os.path.exists(st.path("ts.npz")) and irc_stage(cfg, st))
    for k in range(first - 1, min(last, max(cfg.n_irc, cfg.n_nms))):
        for st in stages:
            if k < cfg.n_irc:
                for direction in ("forward", "reverse"):
                    desc = f"{st.rxn.id}: IRC {direction} point {k + 1}"
                    yield Task(desc, st.rxn.id, False, _irc_label(cfg, st, direction, k))
            if k < cfg.n_nms:
                for point in STATIONARY:
                    yield Task(f"{st.rxn.id}: NMS {point} {k + 1}", st.rxn.id, False, _nms_label(cfg, st, point, k))


def check_minimum(cfg: ReactionConfig, st: ReactionDir, role: str, rec: dict) -> bool:
    """Verify that the optimised reactant or product is a minimum (its Hessian in ``rec``).

    If it is not, the failure is recorded (``<role>_minimum.failed.json``), its labels are moved
    out of the data (to ``<role>_not_minimum_{rtp,hess}.npz``) and the reaction's TS is not searched.
    """
    try:
        verify_minimum(rec["numbers"], rec["positions"], rec["hessian"], cfg.imag_tol_cm)
    except NotAMinimumError as err:
        # labels out of the data first: a run killed before the record is written labels again
        for kind in ("rtp", "hess"):
            if os.path.exists(st.path(f"{kind}_{role}.npz")):
                os.replace(st.path(f"{kind}_{role}.npz"), st.path(f"{role}_not_minimum_{kind}.npz"))
        st.fail(f"{role}_minimum", err)
        return False
    return True


def _irc_label(cfg: ReactionConfig, st: ReactionDir, direction: str, k: int):
    """Task: label the k-th of the points spread along an IRC branch (nothing without an IRC)."""

    def label():
        if not os.path.exists(st.path("irc.npz")):
            return
        irc = load_npz(st.path("irc.npz"))
        idx = irc_points(irc[direction], cfg.n_irc)
        if k < len(idx):
            extra = data_extra(st.rxn.id, "irc", f"irc_{direction}", int(idx[k]),
                               irc_energy_eV=float(irc[f"energies_{direction}_eV"][idx[k]]))  # fmt: skip
            label_point(cfg, st, f"irc_{direction}_{k + 1:02d}", irc[direction][idx[k]], extra)

    return label


def _nms_label(cfg: ReactionConfig, st: ReactionDir, point: str, k: int):
    """Task: label normal-mode sample k around a stationary point (a TS only once its IRC connects)."""

    def label():
        rec = hessian_record(st, point, cfg)
        if rec is None or (point == "ts" and not os.path.exists(st.path("irc.npz"))):
            return
        smp = nms_samples(cfg, st, point, rec)
        extra = data_extra(st.rxn.id, "nms", f"nms_{point}", k + 1,
                           harmonic_energy=float(smp["harmonic_energy"][k]), T=cfg.temperature)  # fmt: skip
        label_point(cfg, st, f"nms_{point}_{k + 1:03d}", smp["positions"][k], extra)

    return label


def run(
    cfg: ReactionConfig,
    reactions: Sequence[Reaction],
    cache_dir: str,
    progress: bool = True,
    workers: int = 1,
    rounds: tuple[int, int] | None = None,
) -> dict:
    """Run (or resume) the whole pipeline; returns :func:`summarize` of the cache.

    The configuration is stored in ``<cache_dir>/config.json``; resuming with a different one is
    refused (the cached results would silently mix two settings).

    To stop a long run without losing the calculation in flight, create ``<cache_dir>/STOP``:
    the run ends after the current task (and removes the file). Killing it loses only that task.

    Args:
        workers: processes that run tasks at once. With more than one, each gets
            ``OMP_NUM_THREADS // workers`` threads (at least one), a reaction's structure tasks
            still run one after another, and its label tasks start once they are all done. For
            molecules this small PySCF's OpenMP scales poorly, so labelling several geometries
            at once gets more out of the cores (see ``--workers`` of ``experiments/make_dataset.py``).
        rounds: ``(first, last)``: label only these rounds (see :func:`tasks`).

    Raises:
        ValueError: if ``cache_dir`` was made with another configuration, ``workers < 1``, or
            ``rounds`` is not ``1 <= first <= last``.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if rounds is not None and not 1 <= rounds[0] <= rounds[1]:
        raise ValueError(f"rounds must be (first, last) with 1 <= first <= last, got {rounds}")
    os.makedirs(cache_dir, exist_ok=True)
    _check_cache_config(os.path.join(cache_dir, "config.json"), cfg)
    for r in reactions:
        save_json(os.path.join(cache_dir, f"{r.id}.reaction.json"), {"id": r.id, "comment": r.comment,
                  "path": r.path, "numbers": r.numbers, "reactant": r.reactant, "product": r.product})  # fmt: skip
    work = list(tasks(cfg, reactions, cache_dir, rounds))
    log.info("run: %d reactions, %d tasks, %d worker(s), cache %s", len(reactions), len(work), workers, cache_dir)

    bar = tqdm(total=len(work), disable=not progress, unit="task", smoothing=0.05, dynamic_ncols=True)
    stop = os.path.join(cache_dir, "STOP")
    with bar:
        if workers == 1:
            for task in work:
                if _stop_requested(stop, task):
                    break
                bar.set_description(task.description[:48])
                task.run()
                bar.update()
        else:
            _run_in_processes(cfg, reactions, cache_dir, rounds, work, workers, bar, stop)
    return summarize(cache_dir)


def _check_cache_config(cfg_path: str, cfg: ReactionConfig) -> None:
    """Refuse to resume a cache made with another configuration, except for looser
    :data:`ACCEPTANCE` limits; record the configuration the run uses."""
    if not os.path.exists(cfg_path):
        save_json(cfg_path, cfg.to_json())
        return
    stored = load_json(cfg_path)
    old = ReactionConfig.from_json(stored)
    if dataclasses.replace(old, **{k: getattr(cfg, k) for k in ACCEPTANCE}) != cfg:
        raise ValueError(f"{cfg_path}: the cache was made with another configuration:\n{old}\nnow:\n{cfg}")
    changed = {k: (getattr(old, k), getattr(cfg, k)) for k in ACCEPTANCE if getattr(old, k) != getattr(cfg, k)}
    text = ", ".join(f"{k} {a:g} -> {b:g}" for k, (a, b) in changed.items())
    if any(b < a for a, b in changed.values()):
        raise ValueError(f"{cfg_path}: the cache's labels were accepted under looser Hessian checks than asked for "
                         f"({text}); use a new cache")  # fmt: skip
    if changed:
        log.warning("%s: looser Hessian checks (%s): rejected geometries that pass them are labelled again",
                    cfg_path, text)  # fmt: skip
    if changed or set(stored) != set(cfg.to_json()):  # or a setting added since, at its default
        save_json(cfg_path, cfg.to_json())


def setup_logging(cache_dir: str, *, to_file: bool = True) -> None:
    """Log the ``phljax.datagen`` logger to stderr and, with ``to_file``, to ``<cache_dir>/log.txt``
    (appending: the cache's labelling record; an assemble-only run, which labels nothing, leaves it
    alone).

    :func:`run`'s worker processes send their records to these handlers too.
    """
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    log.setLevel(logging.INFO)
    log.propagate = False  # geomeTRIC configures the root logger with its own handlers
    log.handlers.clear()
    handlers: list[logging.Handler] = []
    if to_file:
        os.makedirs(cache_dir, exist_ok=True)
        handlers.append(logging.FileHandler(os.path.join(cache_dir, "log.txt")))
    for handler in (*handlers, logging.StreamHandler()):
        handler.setFormatter(fmt)
        log.addHandler(handler)


def _stop_requested(stop: str, next_task: Task) -> bool:
    if not os.path.exists(stop):
        return False
    os.remove(stop)
    log.info("run: %s found, stopping before %r", stop, next_task.description)
    return True


def _run_in_processes(cfg, reactions, cache_dir, rounds, work: list[Task], workers: int, bar, stop: str) -> None:
    """Run ``work`` in ``workers`` spawned processes, in list order as far as dependencies allow.

    A task is ready when it is a structure task of a reaction with no structure task running (the
    earliest pending one of its reaction is then the one taken, as the list is scanned in order), or
    a label task of a reaction whose structure tasks have all finished. A worker's exception
    ends the run after the tasks in flight finish (their results are cached). A worker process
    that dies (killed from outside, out of memory) breaks the pool: the tasks in flight are logged
    and queued again in new workers, up to ``_MAX_RESTARTS`` times per run. A worker whose parent
    process is gone (the run killed) exits within a second instead of idling on as an orphan.
    """

    threads = max(1, int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1) // workers)
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no forked OpenMP or JAX state
    records = ctx.Queue()
    listener = QueueListener(records, *log.handlers, respect_handler_level=True)
    # spawned workers read the thread counts from the environment when numpy and PySCF load
    saved = {k: os.environ.get(k) for k in _THREAD_VARS}
    os.environ.update({k: str(threads) for k in _THREAD_VARS})
    queue = _Queue(work)
    restarts = 0
    listener.start()
    try:
        init = (cfg, list(reactions), cache_dir, rounds, records, threads, os.getpid())
        while True:
            try:
                with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=init) as pool:
                    while queue.submit_ready(pool, workers, stop, bar):
                        queue.collect(bar)
                return
            except cf.process.BrokenProcessPool:
                restarts += 1
                lost = queue.requeue_running()
                log.error("run: a worker process died (killed, or out of memory) during %s; %s",
                          ", ".join(repr(work[i].description) for i in lost) or "its start",
                          "new workers take over" if restarts <= _MAX_RESTARTS else "stopping")  # fmt: skip
                if restarts > _MAX_RESTARTS:
                    raise
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        listener.stop()


_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
_MAX_RESTARTS = 3  # worker pools replaced per run after a worker process died


class _Queue:
    """The scheduler's state, kept across worker pools: the tasks waiting (indices into ``work``,
    in list order), those running, and how many structure tasks each reaction still needs."""

    def __init__(self, work: list[Task]):
        self.work = work
        self.pending = list(range(len(work)))
        self.running: dict[Any, int] = {}  # future -> index
        self.chain_left = collections.Counter(t.reaction for t in work if t.structure)
        self.stopping = False

    def submit_ready(self, pool, workers: int, stop: str, bar) -> bool:
        """Submit ready tasks up to ``workers`` running; False once nothing runs (done or stopped)."""
        if self.pending and not self.stopping and _stop_requested(stop, self.work[self.pending[0]]):
            self.stopping = True
        busy = {self.work[i].reaction for i in self.running.values() if self.work[i].structure}
        for i in list(self.pending):
            if self.stopping or len(self.running) >= workers:
                break
            t = self.work[i]
            ready = t.reaction not in busy if t.structure else self.chain_left[t.reaction] == 0
            if ready:
                self.running[pool.submit(_worker_run, i, t.description)] = i
                self.pending.remove(i)
                if t.structure:
                    busy.add(t.reaction)
                bar.set_description(t.description[:48])
        if not self.running and self.pending and not self.stopping:  # a chain's next link is always ready
            raise RuntimeError(f"no task ready of {len(self.pending)} pending")
        return bool(self.running)

    def collect(self, bar) -> None:
        """Wait for a running task to finish; re-raise its exception."""

        finished, _ = cf.wait(self.running, return_when=cf.FIRST_COMPLETED)
        for future in finished:
            future.result()
            t = self.work[self.running.pop(future)]
            self.chain_left[t.reaction] -= t.structure
            bar.update()

    def requeue_running(self) -> list[int]:
        """After the pool broke: the tasks that were running wait again (a finished one is skipped,
        as its result is cached). Returns them."""
        lost = sorted(self.running.values())
        self.pending = sorted(self.pending + lost)
        self.running.clear()
        return lost


_WORKER_TASKS: list[Task] = []


def _worker_init(cfg, reactions, cache_dir, rounds, records, threads, parent: int) -> None:
    """In a worker process: log to the parent's handlers, set the threads, build the task list,
    and watch the parent (``parent``, its pid)."""
    threading.Thread(target=_exit_with_parent, args=(parent,), name="exit-with-parent", daemon=True).start()

    log.handlers[:] = [QueueHandler(records)]
    log.setLevel(logging.INFO)
    log.propagate = False
    from pyscf import lib  # noqa: PLC0415 (optional: the `data` extra)

    lib.num_threads(threads)
    _WORKER_TASKS[:] = tasks(cfg, reactions, cache_dir, rounds)


def _exit_with_parent(parent: int, poll_s: float = 1.0) -> None:
    """End this worker process once ``parent`` is no longer its parent (the run was killed).

    A process pool's workers hold both ends of its queues, so they never see the parent die: they
    would finish the task in flight, then wait for the next one forever. Exiting at once loses at
    most that task (every cache file is written atomically); the next run computes it again.
    """
    while os.getppid() == parent:
        time.sleep(poll_s)
    os._exit(1)


def _worker_run(index: int, description: str) -> None:
    task = _WORKER_TASKS[index]
    if task.description != description:  # the worker's list must be the parent's
        raise RuntimeError(f"worker task {index} is {task.description!r}, the parent's is {description!r}")
    task.run()


def cached_records(cache_dir: str, category: str | None = None) -> list[dict[str, Any]]:
    """Every labelled geometry of the cache (the data, not the helper Hessians), sorted by path."""
    out = []
    for cat in [category] if category else CATEGORIES:
        for p in sorted(glob.glob(os.path.join(cache_dir, "*", _PATTERNS[cat]))):
            out.append(load_npz(p))
    return out


def assemble(cache_dir: str, out_dir: str, prefix: str = "chon_reactions") -> dict[str, Any]:
    """Write ``<prefix>-RTP.h5``, ``-IRC.h5`` and ``-NMS.h5`` (ANI layout, Hartree/Angstrom).

    Runs on a partial cache too; returns :func:`summarize` plus the written paths.
    """
    os.makedirs(out_dir, exist_ok=True)
    written = {}
    for cat in CATEGORIES:
        recs = cached_records(cache_dir, cat)
        if not recs:
            continue
        if cat == "irc":
            _add_irc_ends(cache_dir, recs)
        path = os.path.join(out_dir, f"{prefix}-{cat.upper()}.h5")
        write_h5(path, to_molecules(recs))
        written[cat] = path
        log.info("assembled %d %s geometries into %s", len(recs), cat.upper(), path)
    summary = summarize(cache_dir)
    summary["files"] = {k: os.path.basename(v) for k, v in written.items()}
    save_json(os.path.join(cache_dir, "summary.json"), summary)
    return summary


def _add_irc_ends(cache_dir: str, records: list[dict[str, Any]]) -> None:
    """Give each IRC record ``toward``: the end (reactant or product) its branch relaxes to.

    Sella's "forward" follows the sign of the TS's imaginary mode, so it leads to the product
    for some reactions and to the reactant for others; ``toward`` says which.
    """
    ends: dict[str, dict[str, Any]] = {}
    for rec in records:
        rid = str(rec["reaction"])
        if rid not in ends:
            ends[rid] = load_npz(os.path.join(cache_dir, rid, "irc.npz"))
        rec["toward"] = np.str_(ends[rid][f"end_{str(rec['point']).removeprefix('irc_')}"])


def summarize(cache_dir: str) -> dict[str, Any]:
    """Counts per reaction and category, barriers, failures, compute time (JSON-ready).

    Energies kcal/mol, times seconds, frequencies cm^-1.
    """
    kcal = units.HARTREE / units.KCAL_MOL  # kcal/mol per Hartree (reader side, as training reads the labels)
    per: dict[str, Any] = {}
    wall = 0.0
    cfg_path = os.path.join(cache_dir, "config.json")
    cfg = load_json(cfg_path) if os.path.exists(cfg_path) else None
    versions = collections.defaultdict(set)  # program -> the versions that made labels (from their records)
    # per category: energy above the reaction's optimised reactant, largest force component
    spread = {c: {"energy_kcal": [], "max_force_eV_A": []} for c in CATEGORIES}
    ev_per_ha_bohr = units.HARTREE / units.BOHR
    for rx_path in sorted(glob.glob(os.path.join(cache_dir, "*.reaction.json"))):
        rx = load_json(rx_path)
        rid = rx["id"]
        d = os.path.join(cache_dir, rid)
        info: dict[str, Any] = {"comment": rx["comment"], "n_atoms": len(rx["numbers"]),
                                "numbers": sorted(set(rx["numbers"]))}  # fmt: skip
        for cat in CATEGORIES:
            info[f"n_{cat}"] = 0
        ref_p = os.path.join(d, "rtp_reactant.npz")  # the reactant's label: same terms as every other
        e_ref = float(load_npz(ref_p)["energy"]) if os.path.exists(ref_p) else None
        for rec in cached_records_of(d):
            cat = str(rec["category"])
            info[f"n_{cat}"] += 1
            wall += float(rec["wall_total"])
            for program, version in _programs(json.loads(str(rec["level"]))):
                versions[program].add(version)
            if e_ref is not None:
                spread[cat]["energy_kcal"].append((float(rec["energy"]) - e_ref) * kcal)
            spread[cat]["max_force_eV_A"].append(float(np.abs(rec["gradient"]).max()) * ev_per_ha_bohr)
        helper = [load_npz(p) for p in glob.glob(os.path.join(d, "hess_*.npz"))]
        wall += sum(float(h["wall_total"]) for h in helper)
        stale = [load_npz(p) for p in glob.glob(os.path.join(d, "stale_" + _PATTERNS["nms"]))]
        wall += sum(float(r["wall_total"]) for r in stale)  # spent, though no longer data
        info["n_stale"] = len(stale)
        info["nms_frozen_cm"] = {}
        for point in STATIONARY:
            p = os.path.join(d, f"nms_{point}_samples.npz")
            smp = load_npz(p) if os.path.exists(p) else {}
            if "frozen" in smp and smp["frozen"].any():
                info["nms_frozen_cm"][point] = [round(float(f)) for f in smp["freq_cm"][smp["frozen"]]]
        for name in ("reactant_opt", "product_opt", "ts", "irc"):
            p = os.path.join(d, name + ".npz")
            if os.path.exists(p):
                wall += float(load_npz(p)["wall"])  # the TS's includes its NEB
        ts_p = os.path.join(d, "ts.npz")
        if os.path.exists(ts_p):
            ts = load_npz(ts_p)
            info["imaginary_cm"] = round(float(ts["imaginary_cm"]), 1)
            r_p = os.path.join(d, "reactant_opt.npz")
            p_p = os.path.join(d, "product_opt.npz")
            info["barrier_kcal"] = round((float(ts["energy"]) - float(load_npz(r_p)["energy"])) * kcal, 2)
            info["reaction_energy_kcal"] = round(
                (float(load_npz(p_p)["energy"]) - float(load_npz(r_p)["energy"])) * kcal, 2
            )
        fails = [load_json(p) for p in sorted(glob.glob(os.path.join(d, "*.failed.json")))]
        stems = [p.removesuffix(".rejected.json") for p in sorted(glob.glob(os.path.join(d, "*.rejected.json")))]
        rejected = [r for r in map(rejection, stems) if r is not None]
        info["failures"] = [f"{f['stage']}: {f['reason']}" for f in fails]
        info["rejected"] = [f"{os.path.basename(r['where'])}: {r['reason']}" for r in rejected]
        irc_yield = _irc_yield(cfg, d)
        if irc_yield is not None:
            info["short_irc_branches"] = {b: k for b, k in irc_yield.items() if k < cfg["n_irc"]}
        info["n_planned"] = _planned(cfg, info, irc_yield)
        fd = [float(load_npz(p)["fd_rel_error"]) for p in glob.glob(os.path.join(d, "rtp_*.npz"))
              if "fd_rel_error" in np.load(p).files]  # fmt: skip
        if fd:
            info["fd_rel_error_max"] = max(fd)
        per[rid] = info
    totals = {f"n_{c}": sum(v[f"n_{c}"] for v in per.values()) for c in CATEGORIES}
    return {
        "reactions": per,
        **totals,
        "n_geometries": sum(totals.values()),
        "n_planned": sum(v["n_planned"] for v in per.values()),
        "n_rejected": sum(len(v["rejected"]) for v in per.values()),
        "n_failed_reactions": sum(bool(v["failures"]) for v in per.values()),
        "compute_s": wall,
        "programs": [f"{p} {' / '.join(sorted(versions[p]))}" for p, _ in _PROGRAMS if p in versions],
        "label_ranges": {
            c: {k: [float(np.min(v)), float(np.median(v)), float(np.max(v))] for k, v in q.items() if v}
            for c, q in spread.items()
        },
        "config": cfg,
    }


def _irc_yield(cfg: dict[str, Any] | None, reaction_dir: str) -> dict[str, int] | None:
    """Distinct IRC points each branch gives ("forward -> product": k); None before the IRC."""
    irc_p = os.path.join(reaction_dir, "irc.npz")
    if cfg is None or not os.path.exists(irc_p):
        return None
    irc = load_npz(irc_p)
    return {f"{b} -> {irc[f'end_{b}']}": len(irc_points(irc[b], cfg["n_irc"])) for b in ("forward", "reverse")}


def _planned(cfg: dict[str, Any] | None, info: dict[str, Any], irc_yield: dict[str, int] | None) -> int:
    """Labelled geometries a finished run gives this reaction: 3 RTP, the IRC points its branches
    yield (2 n_irc before the IRC exists), 3 n_nms NMS; a failed reaction, what it has."""
    if info["failures"] or cfg is None:
        return info["n_rtp"] + info["n_irc"] + info["n_nms"]
    n_irc = sum(irc_yield.values()) if irc_yield is not None else 2 * cfg["n_irc"]
    return len(STATIONARY) + n_irc + len(STATIONARY) * cfg["n_nms"]


_PROGRAMS = (("PySCF", "pyscf_version"), ("libxc", "libxc_version"), ("geomeTRIC", "geometric_version"))


def _programs(level: dict[str, Any]) -> list[tuple[str, str]]:
    """[("PySCF", "2.14.0"), ("libxc", "7.0.0"), ...] from a label's recorded level of theory (a
    label made where geomeTRIC is not installed records no geomeTRIC version)."""
    return [(name, level[key]) for name, key in _PROGRAMS if key in level]


def cached_records_of(reaction_dir: str) -> Iterator[dict[str, Any]]:
    """The labelled data geometries of one reaction's cache directory."""
    for pat in _PATTERNS.values():
        for p in sorted(glob.glob(os.path.join(reaction_dir, pat))):
            yield load_npz(p)
