"""The study: a grid of training runs (protocol x scheme x probe regime x seed), run resumably, and
its aggregation into the paper's tables with paired statistics over seeds.

The question it answers: do E-F-HVP schemes match full-Hessian E-F-H training, and do random
probes beat one-hot ones? One cell is one `phljax.train.train` run; seed s sets both the
initialisation (and probes) and the split, so the schemes of one seed are paired.

A study root holds

    <root>/study.json                   the study's settings (base config, folds, grid); checked on resume
    <root>/STOP                         `touch` it: the study stops after the run in flight
    <root>/aggregate.json               `aggregate(root)`
    <root>/<protocol>/<key>-s<seed>/    one cell: train's work directory (config.json, model.json,
                                        metrics.jsonl, checkpoints/, results.json written last = done)
                                        and, while a study process trains it, study.lock

Keys (directory names) of the schemes: `ef` (E-F), `efh` (E-F-H), and `efhvp-onehot-<regime>`,
`efhvp-random-<regime>` (E-F-HVP with one-hot or Gaussian probes; regime `randomized` = new probes
every step, `fixed` = one probe per molecule for the whole run). E-F and E-F-H have no regime and
enter both regimes' tables. Example: `results/study/random/efhvp-random-fixed-s0`.

Errors are read from `results.json["errors_kcal_mol"]`: energy kcal/mol, forces kcal/mol/A,
Hessian kcal/mol/A^2.

References:
    Rodriguez et al., "Projected Hessian Learning: Fast Curvature Supervision for Accurate
    Machine-Learning Interatomic Potentials", arXiv:2603.04523 (2026), Tables 1 and 2.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import re
import socket
import time
import traceback
from collections.abc import Callable, Sequence

import numpy as np
from scipy import stats

from phljax import data as phdata
from phljax.config import Config
from phljax.losses import SCHEMES
from phljax.train import train
from phljax.units import KCAL_MOL

__all__ = [
    "HVP_PROBES",
    "SCHEME_SLUGS",
    "REGIMES",
    "PROTOCOLS",
    "SUBSETS",
    "QUANTITIES",
    "Cell",
    "Study",
    "CellStatus",
    "protocol_config",
    "reaction_folds",
    "dataset_reactions",
    "cell_config",
    "open_study",
    "acquire_lock",
    "release_lock",
    "run_study",
    "status",
    "format_status",
    "comparison_pairs",
    "aggregate",
    "render_tables",
    "learning_curves",
]

# --probe value -> directory slug of the scheme
SCHEME_SLUGS = {"none": "ef", "onehot": "efhvp-onehot", "random": "efhvp-random", "full": "efh"}
HVP_PROBES = ("onehot", "random")
REGIMES = ("randomized", "fixed")  # probe_mode of the HVP schemes, in priority order
PROTOCOLS = {
    "random": "80/10/10 random split of every geometry",
    "extrapolate": "train/validate on RTP+IRC, test on every NMS geometry",
    "reactions": "leave reactions out: sorted reactions dealt round-robin into folds, seed s tests fold s % n_folds",
}
_SINGLE_TEST_CATEGORY = {"extrapolate": "nms"}  # protocols whose whole test split is one category
SUBSETS = ("test", "rtp", "irc", "nms")  # table order; "rtp" is results.json's "test/rtp"
QUANTITIES = ("energy_rmse", "forces_rmse", "hessian_rmse")
UNITS = {"energy": "kcal/mol", "forces": "kcal/mol/A", "hessian": "kcal/mol/A^2"}
STUDY_JSON, STOP, LOCK, FAILED = "study.json", "STOP", "study.lock", "study_failed.json"

# Config fields every cell sets itself (a base config must leave them at their defaults) ...
OWNED_FIELDS = ("probe", "probe_dist", "probe_mode", "seed", "split_seed", "holdout", "test_fraction", "test_reactions")
# ... and fields that do not change a run's result (free to differ when a study is continued).
EXECUTION_FIELDS = frozenset(
    {
        "workdir",
        "progress",
        "val_errors_every",
        "devices",
        "hessian_chunk",
        "coordinator_address",
        "num_processes",
        "process_id",
    }
)
_KEYS = {
    SCHEME_SLUGS[p] + (f"-{r}" if r else ""): (p, r)
    for p in SCHEME_SLUGS
    for r in (REGIMES if p in HVP_PROBES else (None,))
}


@dataclasses.dataclass(frozen=True)
class Cell:
    """One training run of the grid."""

    protocol: str  # one of PROTOCOLS
    probe: str  # none | onehot | random | full (Config.probe)
    regime: str | None  # randomized | fixed for onehot/random, None for E-F and E-F-H
    seed: int  # Config.seed and Config.split_seed

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {list(PROTOCOLS)}, got {self.protocol!r}")
        if self.probe not in SCHEME_SLUGS:
            raise ValueError(f"probe must be one of {list(SCHEME_SLUGS)}, got {self.probe!r}")
        if (self.probe in HVP_PROBES) != (self.regime in REGIMES):
            raise ValueError(
                f"probe {self.probe!r} takes regime in {REGIMES} iff it is an HVP scheme, got {self.regime!r}"
            )
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")

    @property
    def key(self) -> str:
        """Scheme and regime as a directory slug, e.g. 'efhvp-random-fixed' or 'ef'."""
        return SCHEME_SLUGS[self.probe] + (f"-{self.regime}" if self.regime else "")

    @property
    def name(self) -> str:
        return f"{self.key}-s{self.seed}"

    def workdir(self, root: str) -> str:
        return os.path.join(root, self.protocol, self.name)

    @classmethod
    def parse(cls, protocol: str, name: str) -> Cell | None:
        """The cell of directory `<protocol>/<name>`, or None if `name` is no cell's."""
        match = re.fullmatch(r"(.+)-s(\d+)", name)
        if protocol not in PROTOCOLS or not match or match[1] not in _KEYS:
            return None
        return cls(protocol, *_KEYS[match[1]], int(match[2]))


def _label(key: str) -> str:
    probe, regime = _KEYS[key]
    return SCHEMES[probe] + (f" ({regime})" if regime else "")


@dataclasses.dataclass(frozen=True)
class Study:
    """The grid: protocols x schemes (x regimes for the HVP schemes) x seeds 0..seeds-1."""

    protocols: tuple[str, ...] = ("random", "extrapolate")
    probes: tuple[str, ...] = tuple(SCHEME_SLUGS)
    regimes: tuple[str, ...] = REGIMES
    seeds: int = 5
    n_folds: int = 4  # folds of the `reactions` protocol

    def __post_init__(self):
        for name, allowed in (("protocols", PROTOCOLS), ("probes", SCHEME_SLUGS), ("regimes", REGIMES)):
            values = getattr(self, name)
            if not values or len(set(values)) != len(values) or not set(values) <= set(allowed):
                raise ValueError(f"{name} must be distinct values of {list(allowed)}, got {list(values)}")
        if self.seeds < 1 or self.n_folds < 1:
            raise ValueError(f"seeds and n_folds must be >= 1, got {self.seeds} and {self.n_folds}")

    def cells(self) -> list[Cell]:
        """Every cell, priority first: the randomized regime before the fixed one, protocols in the
        order given, then seeds ascending across schemes (seed 0 of every scheme, then seed 1, ...),
        so a study stopped early holds complete seed-pairs. E-F and E-F-H run with the first regime."""
        regimes = sorted(self.regimes, key=REGIMES.index)
        return [
            Cell(protocol, probe, regime if probe in HVP_PROBES else None, seed)
            for i, regime in enumerate(regimes)
            for protocol in self.protocols
            for seed in range(self.seeds)
            for probe in self.probes
            if probe in HVP_PROBES or i == 0
        ]


def reaction_folds(reactions: Sequence[str], n_folds: int = 4) -> tuple[tuple[str, ...], ...]:
    """The distinct reaction names, sorted, dealt round-robin into `n_folds` folds."""
    names = sorted(set(reactions))
    if len(names) < n_folds:
        raise ValueError(f"{n_folds} folds need at least {n_folds} reactions, got {names}")
    return tuple(tuple(names[i::n_folds]) for i in range(n_folds))


def dataset_reactions(paths: Sequence[str]) -> tuple[str, ...]:
    """Sorted distinct `meta['reaction']` names of the records in `paths` (HDF5 files)."""
    molecules = phdata.load(paths)
    missing = [m.meta.get("origin", i) for i, m in enumerate(molecules) if "reaction" not in m.meta]
    if missing:
        raise ValueError(
            f"the reactions protocol needs a 'reaction' per record; {len(missing)} lack it, e.g. {missing[0]}"
        )
    return tuple(sorted({str(m.meta["reaction"]) for m in molecules}))


def protocol_config(name: str, fold_or_seed: int, *, n_folds: int = 4, folds: Sequence[Sequence[str]] = ()) -> dict:
    """The Config changes of a protocol's split (the validation fraction stays the base config's).

    Args:
        name: `random` (test_fraction 0.1 of every geometry), `extrapolate` (holdout NMS, which is
            all tested; train and validation from RTP+IRC) or `reactions` (the reactions of fold
            `fold_or_seed % n_folds` are all tested, none trained on).
        fold_or_seed: the cell's seed (used by `reactions` only).
        n_folds: number of folds of `reactions`.
        folds: `reaction_folds(...)` of the data (needed by `reactions`).

    Returns:
        {field: value} for `Config.replace`; `test_reactions` is included only when Config has it.
    """
    if name == "random":
        changes = {"holdout": (), "test_fraction": 0.1}
    elif name == "extrapolate":
        changes = {"holdout": ("nms",), "test_fraction": 0.0}
    elif name == "reactions":
        if len(folds) != n_folds:
            raise ValueError(f"the reactions protocol needs {n_folds} folds of reaction names, got {len(folds)}")
        changes = {"holdout": (), "test_fraction": 0.0, "test_reactions": tuple(folds[fold_or_seed % n_folds])}
    else:
        raise ValueError(f"protocol must be one of {list(PROTOCOLS)}, got {name!r}")
    if "test_reactions" in Config.__dataclass_fields__:
        changes.setdefault("test_reactions", ())
    return changes


def cell_config(
    cell: Cell, base: Config, root: str, *, n_folds: int = 4, folds: Sequence[Sequence[str]] = ()
) -> Config:
    """The cell's training config: `base` with its scheme, regime, seeds, split and work directory."""
    changes = protocol_config(cell.protocol, cell.seed, n_folds=n_folds, folds=folds)
    if "test_reactions" in changes and "test_reactions" not in Config.__dataclass_fields__:
        raise ValueError("the reactions protocol needs Config.test_reactions, which this phljax lacks")
    return base.replace(
        probe=cell.probe,
        probe_dist="gaussian",
        probe_mode=cell.regime or "randomized",
        seed=cell.seed,
        split_seed=cell.seed,
        workdir=cell.workdir(root),
        **changes,
    )


def _plain(value):
    return json.loads(json.dumps(value))


def _settings(base: Config, study: Study, folds: Sequence[Sequence[str]]) -> dict:
    base_fields = {k: v for k, v in dataclasses.asdict(base).items() if k not in EXECUTION_FIELDS}
    grid = {"protocols": study.protocols, "probes": study.probes, "regimes": study.regimes, "seeds": study.seeds}
    return _plain({"base": base_fields, "n_folds": study.n_folds, "folds": folds or None, "grid": grid})


def _union(a: Sequence, b: Sequence) -> list:
    return list(a) + [x for x in b if x not in a]


def open_study(root: str, base: Config, study: Study, folds: Sequence[Sequence[str]] = ()) -> dict:
    """Create `<root>/study.json`, or check that the stored study has the same settings.

    The base config (all but EXECUTION_FIELDS), `n_folds` and the reaction folds must match; the
    grid may grow (the stored grid becomes the union, which `status` reports).

    Raises:
        ValueError: the base sets a field the cells own, or `root` holds a study with other
            settings (the message names the fields, old and new values).
    """
    owned = [
        f
        for f in OWNED_FIELDS
        if f in Config.__dataclass_fields__ and getattr(base, f) != Config.__dataclass_fields__[f].default
    ]
    if owned:
        raise ValueError(f"the study sets {owned} for each cell; leave them out of the base config")
    new = _settings(base, study, folds)
    path = os.path.join(root, STUDY_JSON)
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        defaults = _plain({k: getattr(Config(), k) for k in Config.__dataclass_fields__})
        changed = {
            k: (old["base"].get(k, defaults.get(k)), new["base"].get(k, defaults.get(k)))
            for k in set(old["base"]) | set(new["base"])
        }
        changed = {k: v for k, v in changed.items() if v[0] != v[1]}
        for k in ("n_folds", "folds"):
            if old.get(k) is not None and new[k] is not None and old[k] != new[k]:
                changed[k] = (old[k], new[k])
        if changed:
            detail = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(changed.items()))
            raise ValueError(
                f"{root} holds a study with different settings ({sorted(changed)}; {detail}); "
                "use a new --root or the same settings to continue"
            )
        grid = old["grid"]
        new["grid"] = {
            **{k: _union(grid[k], new["grid"][k]) for k in ("protocols", "probes", "regimes")},
            "seeds": max(grid["seeds"], new["grid"]["seeds"]),
        }
        new["folds"] = new["folds"] or old.get("folds")
    os.makedirs(root, exist_ok=True)
    with open(path, "w") as f:
        json.dump(new, f, indent=2)
    return new


def _load_settings(root: str) -> dict:
    path = os.path.join(root, STUDY_JSON)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: {root} is no study root")
    with open(path) as f:
        return json.load(f)


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
    cells = study.cells()
    outcome = {k: [] for k in ("trained", "done", "running", "failed", "left")}
    for i, cell in enumerate(cells):
        rel = os.path.join(cell.protocol, cell.name)
        if os.path.exists(os.path.join(root, STOP)):
            outcome["left"] += [os.path.join(c.protocol, c.name) for c in cells[i:] if not _done(c.workdir(root))]
            log(f"{os.path.join(root, STOP)} found: stopping, {len(outcome['left'])} cells left")
            break
        workdir = cell.workdir(root)
        if _done(workdir):
            outcome["done"].append(rel)
            continue
        if not acquire_lock(workdir):
            outcome["running"].append(rel)
            log(f"[{i + 1}/{len(cells)}] {rel}: locked by {_lock_info(workdir)[0]}, skipped")
            continue
        try:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(workdir, FAILED))
            epochs = len(_metrics(workdir))
            log(f"[{i + 1}/{len(cells)}] {rel}: " + (f"resuming after epoch {epochs}" if epochs else "training"))
            train_fn(cell_config(cell, base, root, n_folds=study.n_folds, folds=folds))
            outcome["trained"].append(rel)
        except Exception as e:
            if not keep_going:
                raise
            with open(os.path.join(workdir, FAILED), "w") as f:
                json.dump({"error": repr(e), "traceback": traceback.format_exc(), "time": time.time()}, f, indent=2)
            outcome["failed"].append(rel)
            log(f"[{i + 1}/{len(cells)}] {rel}: failed ({e!r}), going on")
        finally:
            release_lock(workdir)
    return outcome


def _metrics(workdir: str) -> list[dict]:
    """metrics.jsonl lines, the last line of each epoch (an epoch redone after an interruption)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    return list({line.get("epoch", i + 1): line for i, line in enumerate(lines)}.values())


def _results(workdir: str) -> dict | None:
    path = os.path.join(workdir, "results.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


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
        times = [line["epoch_time_s"] for line in _metrics(workdir) if "epoch_time_s" in line]
        results = _results(workdir)
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
    return "\n".join([*lines, "", summary])


def comparison_pairs(regimes: Sequence[str] = REGIMES) -> list[tuple[str, str, str | None]]:
    """The paper's comparisons as (a, b, regime): a's change relative to the reference b.

    In each regime: random vs one-hot; each HVP scheme vs E-F-H and vs E-F. Then E-F-H vs E-F."""
    pairs = []
    for r in regimes:
        onehot, rand = f"efhvp-onehot-{r}", f"efhvp-random-{r}"
        pairs.append((rand, onehot, r))
        pairs += [(h, ref, r) for h in (onehot, rand) for ref in ("efh", "ef")]
    return [*pairs, ("efh", "ef", None)]


def _subsets(results: dict, protocol: str) -> dict[str, dict]:
    """results.json's kcal/mol errors by short subset name: 'test', 'rtp', 'irc', 'nms', ..."""
    errors = results.get("errors_kcal_mol", {})
    out = {
        "test" if name == "test" else name.removeprefix("test/"): d
        for name, d in errors.items()
        if name == "test" or name.startswith("test/")
    }
    category = _SINGLE_TEST_CATEGORY.get(protocol)
    if category and category not in out and "test" in out and len(out) == 1:
        out[category] = out["test"]  # older results.json: one category, reported as 'test' only
    return out


def _numeric(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _nan_to_none(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _stats(by_seed: dict[int, float]) -> dict:
    """mean, sample std (ddof=1; None for n < 2), n, seeds and values over seeds."""
    seeds = sorted(by_seed)
    values = np.array([by_seed[s] for s in seeds], dtype=float)
    std = float(np.std(values, ddof=1)) if len(values) >= 2 else None
    return {
        "mean": _nan_to_none(float(np.mean(values))),
        "std": _nan_to_none(std),
        "n": len(seeds),
        "seeds": seeds,
        "values": [_nan_to_none(v) for v in values],
    }


def _paired(a: dict[int, float], b: dict[int, float]) -> dict:
    """Paired comparison of a with reference b over the seeds both have.

    Returns:
        n, seeds, mean_diff (mean of a - b), rel_diff_pct (100 (mean a - mean b) / mean b) and
        p_value (two-sided paired t-test, `scipy.stats.ttest_rel`; None for n < 2 or zero spread).
    """
    seeds = sorted(set(a) & set(b))
    x, y = np.array([a[s] for s in seeds], float), np.array([b[s] for s in seeds], float)
    out = {"n": len(seeds), "seeds": seeds, "mean_diff": None, "rel_diff_pct": None, "p_value": None}
    if seeds:
        out["mean_diff"] = _nan_to_none(float(np.mean(x - y)))
        if np.mean(y) != 0:
            out["rel_diff_pct"] = _nan_to_none(float(100 * (np.mean(x) - np.mean(y)) / np.mean(y)))
    if len(seeds) >= 2:
        with np.errstate(divide="ignore", invalid="ignore"):
            out["p_value"] = _nan_to_none(float(stats.ttest_rel(x, y).pvalue))
    return out


def _collect(root: str) -> dict[str, dict[str, dict[int, dict]]]:
    """{protocol: {key: {seed: results}}} of the finished cells under `root`."""
    found: dict = {}
    for protocol in PROTOCOLS:
        folder = os.path.join(root, protocol)
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            cell = Cell.parse(protocol, name)
            results = _results(cell.workdir(root)) if cell else None
            if results is not None:
                found.setdefault(protocol, {}).setdefault(cell.key, {})[cell.seed] = results
    return found


def _ordered(names, first: Sequence[str]) -> list[str]:
    return [n for n in first if n in names] + sorted(set(names) - set(first))


def aggregate(root: str) -> dict:
    """Statistics over seeds of every finished cell under `root`; written to `<root>/aggregate.json`.

    Returns:
        {"root", "units", "protocols": {protocol: {"description",
          "cells": {key: {"scheme", "probe", "regime", "seeds", "epochs_run": stats,
                          "mean_epoch_time_s": stats,
                          "subsets": {subset: {"n_molecules": [per seed], quantity: stats}}}},
          "pairs": {"<a> vs <b>": {"a", "b", "regime",
                                   "subsets": {subset: {quantity: paired}}}}}}}
        with stats = {mean, std (ddof=1), n, seeds, values} and paired = {n, seeds, mean_diff,
        rel_diff_pct, p_value} (`_paired`). Subsets: 'test' and the categories ('rtp', 'irc',
        'nms', ...); quantities: the RMSEs and every other numeric key all of a cell's runs report
        for that subset, in kcal/mol units. NaN is written as null.
    """
    out = {"root": root, "units": UNITS, "protocols": {}}
    for protocol, keys in _collect(root).items():
        cells, values = {}, {}  # values[key][subset][quantity] = {seed: value}
        for key in _ordered(keys, list(_KEYS)):
            runs = keys[key]
            probe, regime = _KEYS[key]
            per_subset = {}
            subsets_of = {seed: _subsets(r, protocol) for seed, r in runs.items()}
            names = {name for subsets in subsets_of.values() for name in subsets}
            for subset in _ordered(names, SUBSETS):
                having = {seed: s[subset] for seed, s in subsets_of.items() if subset in s}
                common = set.intersection(*(set(k for k, v in d.items() if _numeric(v)) for d in having.values()))
                common.discard("n_molecules")
                values.setdefault(key, {})[subset] = {
                    q: {seed: float(d[q]) for seed, d in having.items()} for q in _ordered(common, QUANTITIES)
                }
                per_subset[subset] = {
                    "n_molecules": [having[s].get("n_molecules") for s in sorted(having)],
                    **{q: _stats(v) for q, v in values[key][subset].items()},
                }
            timing = {
                name: _stats({s: float(r[name]) for s, r in runs.items() if _numeric(r.get(name))})
                for name in ("epochs_run", "mean_epoch_time_s")
                if any(_numeric(r.get(name)) for r in runs.values())
            }
            cells[key] = {
                "scheme": _label(key),
                "probe": probe,
                "regime": regime,
                "seeds": sorted(runs),
                **timing,
                "subsets": per_subset,
            }
        pairs = {}
        for a, b, regime in comparison_pairs():
            if a not in values or b not in values:
                continue
            pairs[f"{a} vs {b}"] = {
                "a": a,
                "b": b,
                "regime": regime,
                "subsets": {
                    subset: {
                        q: _paired(qa, values[b][subset][q]) for q, qa in quantities.items() if q in values[b][subset]
                    }
                    for subset, quantities in values[a].items()
                    if subset in values[b]
                },
            }
        out["protocols"][protocol] = {"description": PROTOCOLS[protocol], "cells": cells, "pairs": pairs}
    with open(os.path.join(root, "aggregate.json"), "w") as f:
        json.dump(out, f, indent=2, allow_nan=False)
    return out


def _num(x: float | None) -> str:
    return "–" if x is None else f"{x:.3g}"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x:+.1f}%"


def _p(x: float | None) -> str:
    return "p=–" if x is None else f"p={x:.2g}"


def _columns(protocol: dict) -> list[tuple[str, str]]:
    names = {s for cell in protocol["cells"].values() for s in cell["subsets"]}
    return [(s, q) for s in _ordered(names, SUBSETS) for q in QUANTITIES]


def _header(columns: Sequence[tuple[str, str]], first: Sequence[str], last: Sequence[str] = ()) -> list[str]:
    names = [f"{s.upper() if s != 'test' else 'test'} {q.split('_')[0][0].upper()}" for s, q in columns]
    head = [*first, *names, *last]
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]


def _scheme_table(protocol: dict, keys: Sequence[str], columns, min_seeds: int) -> list[str]:
    lines = _header(columns, ["scheme", "n"], ["epoch (s)"])
    for key in keys:
        cell = protocol["cells"].get(key)
        if cell is None:
            continue
        entries = []
        change = protocol["pairs"].get(f"{key} vs ef", {}).get("subsets", {})
        for subset, q in columns:
            st = cell["subsets"].get(subset, {}).get(q)
            if st is None:
                entries.append("–")
            elif st["n"] < min_seeds:
                entries.append(f"n={st['n']}, not reported")
            else:
                pair = change.get(subset, {}).get(q)
                vs = f" ({_pct(pair['rel_diff_pct'])})" if pair and pair["n"] >= min_seeds else ""
                entries.append(f"{_num(st['mean'])} ± {_num(st['std'])}{vs}")
        t = cell.get("mean_epoch_time_s")
        entries.append("–" if t is None else f"{_num(t['mean'])} ± {_num(t['std'])}")
        lines.append(f"| {cell['scheme']} | {len(cell['seeds'])} | " + " | ".join(entries) + " |")
    return lines


def _pair_entries(pair: dict, columns, min_seeds: int) -> list[str]:
    entries = []
    for subset, q in columns:
        st = pair["subsets"].get(subset, {}).get(q)
        if st is None:
            entries.append("–")
        elif st["n"] < min_seeds:
            entries.append(f"n={st['n']}, not reported")
        else:
            entries.append(f"{_pct(st['rel_diff_pct'])} ({_p(st['p_value'])})")
    return entries


def render_tables(agg: dict, min_seeds: int = 3) -> str:
    """Markdown tables of `aggregate(...)` in the layout of the paper's Tables 1 and 2, per protocol.

    Table 1 (randomized probes) and Table 2 (fixed probes): rows = schemes, columns = energy (E),
    force (F) and Hessian (H) test RMSE per test subset, mean ± sample std over seeds and, for
    all but E-F, the change relative to E-F (paired seeds); Table 2 adds the row "random vs
    one-hot" (change and paired t-test p). Then every comparison of `comparison_pairs` with its
    p-value. Entries over fewer than `min_seeds` seeds read "n=<n>, not reported".
    """
    out = []
    for name, protocol in agg["protocols"].items():
        columns = _columns(protocol)
        out += [f"## Protocol `{name}`: {protocol['description']}", ""]
        out += [
            f"RMSE in kcal/mol (E), kcal/mol/A (F), kcal/mol/A^2 (H); mean ± std over seeds (ddof=1); "
            f"(change vs E-F, paired seeds); entries over < {min_seeds} seeds are not reported.",
            "",
        ]
        for number, regime in ((1, "randomized"), (2, "fixed")):
            keys = ["ef", f"efhvp-onehot-{regime}", f"efhvp-random-{regime}", "efh"]
            if not any(k in protocol["cells"] for k in keys[1:3]):
                continue
            out += [f"### Table {number}: {regime} probes", ""]
            out += _scheme_table(protocol, keys, columns, min_seeds)
            pair = protocol["pairs"].get(f"efhvp-random-{regime} vs efhvp-onehot-{regime}")
            if number == 2 and pair:
                n = min((st["n"] for d in pair["subsets"].values() for st in d.values()), default=0)
                out.append(
                    f"| random vs one-hot | {n} | " + " | ".join(_pair_entries(pair, columns, min_seeds)) + " | |"
                )
            out.append("")
        if protocol["pairs"]:
            out += ["### Pairwise comparisons: change of A relative to B (paired t-test p over common seeds)", ""]
            out += _header(columns, ["A vs B", "n"])
            for pair in protocol["pairs"].values():
                n = min((st["n"] for d in pair["subsets"].values() for st in d.values()), default=0)
                label = f"{_label(pair['a'])} vs {_label(pair['b'])}"
                out.append(f"| {label} | {n} | " + " | ".join(_pair_entries(pair, columns, min_seeds)) + " |")
            out.append("")
    return "\n".join(out)


def _seed_mean(table: np.ndarray) -> np.ndarray:
    """Mean over axis 0 of the finite entries; NaN where there are none."""
    finite = np.isfinite(table)
    count = finite.sum(0)
    return np.where(count > 0, np.where(finite, table, 0.0).sum(0) / np.maximum(count, 1), np.nan)


def learning_curves(root: str) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """Seed-mean validation curves of every started cell, from metrics.jsonl.

    Returns:
        {protocol: {key: {"epoch": [n_epochs], "n_runs": [n_epochs] seeds that reached the epoch,
        "wall_time_s": [n_epochs] cumulative s, "val_loss": [n_epochs], and, when every run has
        validation errors in some lines, "energy_rmse" (kcal/mol), "forces_rmse" (kcal/mol/A),
        "hessian_rmse" (kcal/mol/A^2) from `val_*_rmse` (eV units), NaN at epochs without them}}}.
        Runs of different lengths (early stopping) are averaged over the seeds that reached each epoch.
    """
    rmse = {f"val_{q}": q for q in QUANTITIES}
    out: dict = {}
    for protocol in PROTOCOLS:
        folder = os.path.join(root, protocol)
        if not os.path.isdir(folder):
            continue
        groups: dict[str, list[list[dict]]] = {}
        for name in sorted(os.listdir(folder)):
            cell = Cell.parse(protocol, name)
            lines = _metrics(cell.workdir(root)) if cell else []
            if lines:
                groups.setdefault(cell.key, []).append(lines)
        for key in _ordered(groups, list(_KEYS)):
            runs = groups[key]
            columns = ["wall_time_s", "val_loss"]
            if all(any(all(k in line for k in rmse) for line in run) for run in runs):
                columns += list(rmse)
            length = max(len(run) for run in runs)
            curves = {
                "epoch": np.arange(1, length + 1),
                "n_runs": np.array([sum(len(r) > i for r in runs) for i in range(length)]),
            }
            for column in columns:
                table = np.full((len(runs), length), np.nan)
                for i, run in enumerate(runs):
                    v = np.array([line.get(column, np.nan) for line in run], dtype=float)
                    table[i, : len(v)] = np.cumsum(v) if column == "wall_time_s" else v
                curves[rmse.get(column, column)] = _seed_mean(table / KCAL_MOL if column in rmse else table)
            out.setdefault(protocol, {})[key] = curves
    return out
