"""The study's grid: protocols, schemes, probe regimes and seeds as cells; each cell's config and files.

A study root holds

    <root>/study.json                   the study's settings (base config, folds, grid); checked on resume
    <root>/STOP                         `touch` it: the study stops after the run in flight
    <root>/aggregate.json               `phljax.study.stats.aggregate(root)`
    <root>/<protocol>/<key>-s<seed>/    one cell: train's work directory (config.json, model.json,
                                        metrics.jsonl, checkpoints/, results.json written last = done)
                                        and, while a study process trains it, study.lock

Keys (directory names) of the schemes: `ef` (E-F), `efh` (E-F-H), and `efhvp-onehot-<regime>`,
`efhvp-random-<regime>` (E-F-HVP with one-hot or Gaussian probes; regime `randomized` = new probes
every step, `fixed` = one probe per molecule for the whole run). E-F and E-F-H have no regime and
enter both regimes' tables. Example: `results/study/random/efhvp-random-fixed-s0`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence

from phljax import data as phdata
from phljax.config import Config
from phljax.files import locked, write_atomic
from phljax.losses import SCHEMES

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
    os.makedirs(root, exist_ok=True)
    with locked(path):  # two invocations growing one grid: each keeps the other's part
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
        write_atomic(path, json.dumps(new, indent=2))
    return new


def _load_settings(root: str) -> dict:
    path = os.path.join(root, STUDY_JSON)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: {root} is no study root")
    with open(path) as f:
        return json.load(f)


def cell_metrics(workdir: str) -> list[dict]:
    """A cell's metrics.jsonl lines, the last line of each epoch (an epoch redone after an interruption)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    return list({line.get("epoch", i + 1): line for i, line in enumerate(lines)}.values())


def cell_results(workdir: str) -> dict | None:
    """A cell's results.json (None: the cell is not done)."""
    path = os.path.join(workdir, "results.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)
