"""The size-scaling study (issue 19): does the one-hot / random probe gap widen with molecule size?

Per size bin of the xTB scaling set (:mod:`phljax.datagen.scale`), one model per cell:

- schemes: ``ef`` (E-F), ``onehot``, ``gaussian``, ``rademacher``, ``orthogonal`` (E-F-HVP with
  K probes, default 1) and ``efh`` (E-F-H, only in bins whose training samples carry Hessians);
- HVP regimes over each training sample's stored pool of probes and reference HVPs
  (Hessian-free labels, ``<prefix>-train-<kind>.h5``): ``fixed`` = the first K stored probes for
  the whole run (``--probe-mode data``), ``pool`` = K of the P stored probes drawn afresh every
  step (``--probe-mode pool``); and ``randomized`` (new probes every step from the stored
  Hessians, ``<prefix>-train.h5``: only in bins whose training samples carry Hessians, the only
  regime of ``orthogonal``, which has no pool);
- seeds: seed s sets the initialisation, the train/validation split and the draws.

After training, each cell's best model is evaluated on its bin's test subset (full FD Hessians,
``<prefix>-test.h5``): E, F, H errors, and on every test geometry's error matrix
A = dH^T dH (dH = H_model - H_ref, eV/A^2; the HVP loss divides it by D^2 = (3N)^2) the variance
of the one-probe estimate v^T A v of tr(A) for each probe family, by the closed forms of
:func:`phljax.probes.hutchinson_variance` and by Monte Carlo over drawn probes. If model errors
are local, Rademacher/Gaussian variances grow like N and the one-hot one like N^2 (issue 19);
:func:`aggregate` fits those exponents and compares the schemes per bin with paired t-tests.

    <root>/scaling.json                     the settings (base config, every grid run on it, data)
    <root>/<bin>/<scheme>[-<regime>]-s<seed>/   train's work directory + scale_eval.json (done)
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from phljax.config import Config
from phljax.data import Molecule, load, select_records
from phljax.datagen.labels import make_probes
from phljax.files import locked, write_atomic
from phljax.potential import Potential
from phljax.probes import hutchinson_variance
from phljax.study.grid import cell_metrics
from phljax.study.runner import Job, run_cells
from phljax.study.stats import paired, seed_stats
from phljax.train import train
from phljax.train.optim import replay_schedule
from phljax.units import KCAL_MOL

#: scheme -> (Config.probe, Config.probe_dist)
SCHEMES = {
    "ef": ("none", "gaussian"),
    "onehot": ("onehot", "gaussian"),
    "gaussian": ("random", "gaussian"),
    "rademacher": ("random", "rademacher"),
    "orthogonal": ("random", "orthogonal"),
    "efh": ("full", "gaussian"),
}
HVP_SCHEMES = ("onehot", "gaussian", "rademacher", "orthogonal")
POOL_KINDS = ("onehot", "gaussian", "rademacher")  # the schemes with stored pools (<prefix>-train-<kind>.h5)
REGIMES = {"fixed": "data", "pool": "pool", "randomized": "randomized"}  # regime -> Config.probe_mode
HESSIAN_REGIMES = ("randomized",)  # regimes that train on stored Hessians
FAMILIES = ("gaussian", "rademacher", "onehot")  # estimator families evaluated on every error matrix
EVAL = "scale_eval.json"
QUANTITIES = ("energy_rmse", "forces_rmse", "hessian_rmse")  # test errors of every evaluated cell
SETTINGS = "scaling.json"
# (key a, key b) compared per bin: one-hot against each random family per regime, K = 4
# orthogonal against K = 4 i.i.d. Gaussian probes (randomized regime), and the fixed-regime HVP
# schemes against E-F (what Hessian-free curvature labels buy) and, where E-F-H ran, the HVP
# schemes against E-F-H (what they give up against training on every Hessian entry)
PAIRS = (
    *((f"onehot-{r}", f"{b}-{r}") for r in REGIMES for b in ("gaussian", "rademacher")),
    ("gaussian-randomized-k4", "orthogonal-randomized-k4"),
    ("ef", "onehot-fixed"),
    ("ef", "gaussian-fixed"),
    ("efh", "onehot-fixed"),
    ("efh", "gaussian-fixed"),
    ("efh", "gaussian-randomized-k4"),
)


@dataclasses.dataclass(frozen=True)
class ScaleCell:
    """One training run: a size bin, a scheme, an HVP regime (None for E-F and E-F-H), a seed."""

    bin: str
    scheme: str
    regime: str | None
    seed: int
    num_probes: int = 1  # K (HVP schemes)

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {list(SCHEMES)}, got {self.scheme!r}")
        if (self.regime is None) != (self.scheme not in HVP_SCHEMES) or (self.regime and self.regime not in REGIMES):
            raise ValueError(f"{self.scheme}: regime must be one of {list(REGIMES)} for HVP schemes, else None; "
                             f"got {self.regime!r}")  # fmt: skip
        if self.regime and self.regime not in HESSIAN_REGIMES and self.scheme not in POOL_KINDS:
            raise ValueError(f"{self.scheme} has no stored pool: its only regime is {HESSIAN_REGIMES}")

    @property
    def key(self) -> str:
        k = f"-k{self.num_probes}" if self.regime and self.num_probes != 1 else ""
        return self.scheme + (f"-{self.regime}" if self.regime else "") + k

    @property
    def name(self) -> str:
        return f"{self.key}-s{self.seed}"

    def workdir(self, root: str) -> str:
        return os.path.join(root, self.bin, self.name)


@dataclasses.dataclass(frozen=True)
class ScaleGrid:
    """The cells: seed-major (seed 0 of every bin and scheme first), then bins small to large."""

    bins: tuple[str, ...]
    schemes: tuple[str, ...] = ("ef", "onehot", "gaussian", "rademacher")
    regimes: tuple[str, ...] = ("fixed", "pool")
    seeds: int = 3
    hessian_bins: tuple[str, ...] = ()  # bins whose training samples carry Hessians: E-F-H, the randomized regime
    num_probes: int = 1  # K of the HVP schemes

    def cells(self) -> list[ScaleCell]:
        """Every valid cell: E-F-H and the randomized regime only in ``hessian_bins``; the fixed and
        pool regimes only for schemes with a stored pool."""
        out = []
        for seed in range(self.seeds):
            for b in sorted(self.bins, key=bin_low):
                for scheme in self.schemes:
                    if scheme == "efh" and b not in self.hessian_bins:
                        continue
                    for regime in self.regimes if scheme in HVP_SCHEMES else (None,):
                        if regime in HESSIAN_REGIMES and b not in self.hessian_bins:
                            continue
                        if regime and regime not in HESSIAN_REGIMES and scheme not in POOL_KINDS:
                            continue
                        out.append(ScaleCell(b, scheme, regime, seed, self.num_probes if regime else 1))
        return out

    def to_json(self) -> dict[str, Any]:
        """The grid as plain JSON (tuples as lists): how ``scaling.json`` records it."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


def bin_low(name: str) -> int:
    """The lower edge of a size bin 'LO-HI'."""
    return int(name.split("-")[0])


def data_paths(data_dir: str, prefix: str) -> dict[str, str]:
    """{'train', 'test', 'train-<kind>' for each pool kind}: the scaling set's files."""
    out = {"train": f"{prefix}-train.h5", "test": f"{prefix}-test.h5"}
    out |= {f"train-{k}": f"{prefix}-train-{k}.h5" for k in POOL_KINDS}
    return {k: os.path.join(data_dir, v) for k, v in out.items()}


def cell_config(cell: ScaleCell, base: Config, root: str, paths: dict[str, str]) -> Config:
    """The cell's config: its bin (``select``), training file, scheme, probes and seed; no test split
    (the bin's Hessian subset is the test, see :func:`evaluate_cell`)."""
    probe, dist = SCHEMES[cell.scheme]
    pooled = cell.regime is not None and cell.regime not in HESSIAN_REGIMES
    return base.replace(
        data=(paths[f"train-{cell.scheme}"] if pooled else paths["train"],),
        select=(f"size_bin={cell.bin}",),
        test_fraction=0.0,
        probe=probe,
        probe_dist=dist,
        probe_mode=REGIMES[cell.regime] if cell.regime else "randomized",
        num_probes=cell.num_probes,
        seed=cell.seed,
        split_seed=cell.seed,
        workdir=cell.workdir(root),
    )


def estimator_variances(
    dh: np.ndarray, rng: np.random.Generator, n_draws: int = 256, num_probes: int = 4
) -> dict[str, Any]:
    """Variance of the one-probe estimate v^T A v of tr(A), A = dH^T dH, per probe family, and of
    the K-probe estimate for K i.i.d. Gaussian against K orthogonalised probes.

    Args:
        dh: [D, D] Hessian error H_model - H_ref (eV/A^2), symmetrised.
        rng: draws of the Monte Carlo check.
        n_draws: probes per family for the empirical variance.

    Returns:
        ``trace`` tr(A), ``formula`` {family: closed form} and ``empirical`` {family: sample
        variance of v^T A v over ``n_draws`` probes}, in (eV/A^2)^4; the HVP loss of a probe is
        v^T A v / D^2, so its variance is these over D^4. ``k_probe``: {'gaussian', 'orthogonal':
        closed form of the K = ``num_probes`` estimate}, ``k`` = K.
    """
    dh = 0.5 * (dh + dh.T)
    a = dh.T @ dh
    d = a.shape[0]
    with jax.enable_x64(True):
        a64 = jnp.asarray(a)
        formula = {f: float(hutchinson_variance(a64, f)) for f in FAMILIES}
        k_probe = {f: float(hutchinson_variance(a64, f, num_probes)) for f in ("gaussian", "orthogonal")}
    draws = {f: make_probes(f, n_draws, d // 3, rng).reshape(n_draws, d) for f in FAMILIES}
    empirical = {f: float(np.var(np.einsum("ki,ij,kj->k", v, a, v), ddof=1)) for f, v in draws.items()}
    return {"trace": float(np.trace(a)), "formula": formula, "empirical": empirical, "k_probe": k_probe,
            "k": num_probes}  # fmt: skip


def evaluate_cell(workdir: str, test: Sequence[Molecule], *, seed: int = 0, n_draws: int = 256) -> dict[str, Any]:
    """Errors of the cell's best model on its bin's test geometries, and the estimator variances of
    each geometry's error matrix (:func:`estimator_variances`); written to ``<workdir>/scale_eval.json``."""
    potential = Potential.from_workdir(workdir)
    rng = np.random.default_rng(seed)
    rows = []
    for m in test:
        e, f = potential.energy_and_forces(m.numbers, m.positions, dtype=np.float64)
        h = potential.hessian(m.numbers, m.positions, dtype=np.float64)
        n = m.n_atoms
        dh = h - m.hessian.reshape(3 * n, 3 * n)
        rows.append({
            "name": m.meta.get("name"), "index": m.meta.get("index"), "n_atoms": n,
            "energy_error_ev": float(e - m.energy), "forces_sq_sum": float(np.sum((f - m.forces) ** 2)),
            "hessian_sq_sum": float(np.sum(dh**2)), **estimator_variances(dh, rng, n_draws),
        })  # fmt: skip
    out = {"geometries": rows, **summarize_errors(rows), "n_draws": n_draws}
    write_atomic(os.path.join(workdir, EVAL), json.dumps(out, indent=1))  # its existence marks the cell done
    return out


def summarize_errors(rows: Sequence[dict]) -> dict[str, float]:
    """E, F, H RMSE over the geometries (kcal/mol, kcal/mol/A, kcal/mol/A^2; element-wise for F and H)."""
    n = np.array([r["n_atoms"] for r in rows], float)
    e = np.array([r["energy_error_ev"] for r in rows])
    f = sum(r["forces_sq_sum"] for r in rows) / np.sum(3 * n)
    h = sum(r["hessian_sq_sum"] for r in rows) / np.sum((3 * n) ** 2)
    return {
        "energy_rmse": float(np.sqrt(np.mean(e**2)) / KCAL_MOL),
        "forces_rmse": float(np.sqrt(f) / KCAL_MOL),
        "hessian_rmse": float(np.sqrt(h) / KCAL_MOL),
        "mean_atoms": float(n.mean()),
    }


def _is_evaluated(workdir: str) -> bool:
    return os.path.exists(os.path.join(workdir, EVAL))


def bin_test_set(paths: dict[str, str], bin_name: str) -> list[Molecule]:
    """The bin's test geometries (with Hessians)."""
    return select_records(load([paths["test"]]), [f"size_bin={bin_name}"])


def run_scaling(
    root: str,
    base: Config,
    grid: ScaleGrid,
    paths: dict[str, str],
    *,
    train_fn: Callable[[Config], dict] = train,
    keep_going: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, list[str]]:
    """Train and evaluate the grid's cells in order, resumably (a cell is done when it has
    ``scale_eval.json``; train resumes from its checkpoints; ``<root>/STOP`` stops before the next)."""
    os.makedirs(root, exist_ok=True)
    this = grid.to_json()
    settings = {"base": json.loads(base.to_json()), "grids": [this], "paths": paths}
    path = os.path.join(root, SETTINGS)
    with locked(path):  # two invocations on one root: each keeps the other's grid
        if os.path.exists(path):
            with open(path) as f:
                old = json.load(f)
            if old["base"] != settings["base"]:
                changed = sorted(k for k in settings["base"] if old["base"].get(k) != settings["base"][k])
                raise ValueError(f"{path}: this root was run with another base config (differs in {changed})")
            grids = old.get("grids", [old["grid"]] if "grid" in old else [])  # "grid": before grids were kept
            settings["grids"] = grids + ([] if this in grids else [this])
        write_atomic(path, json.dumps(settings, indent=1))
    tests: dict[str, list[Molecule]] = {}

    def make(cell: ScaleCell) -> None:
        config = cell_config(cell, base, root, paths)
        if not os.path.exists(os.path.join(config.workdir, "results.json")):
            train_fn(config)
        if cell.bin not in tests:
            tests[cell.bin] = bin_test_set(paths, cell.bin)
        evaluate_cell(config.workdir, tests[cell.bin], seed=cell.seed)

    jobs = [Job(os.path.join(c.bin, c.name), c.workdir(root), lambda c=c: make(c), _is_evaluated) for c in grid.cells()]
    return run_cells(root, jobs, keep_going=keep_going, log=log)


#: results.json "stopped" -> the base-config fields that decide it (an amendment of one reopens the cell)
STOPPED_BY = {"epochs": ("epochs",), "early_stopping": ("early_stopping", "plateau_warmup"),
              "lr_floor": ("plateau_warmup",)}  # fmt: skip
SUPERSEDED = ".superseded.json"  # suffix of a reopened cell's results.json and scale_eval.json
RESTARTED = ".superseded"  # suffix of a restarted cell's folder (its logs and results, without checkpoints)


def _schedule_changes(workdir: str, plateau_warmup: int) -> bool:
    """Would ``plateau_warmup`` change the learning rates the cell's metrics.jsonl logged so far?
    (:func:`phljax.train.optim.replay_schedule` on its validation losses, with its config's schedule.)"""
    with open(os.path.join(workdir, "config.json")) as f:
        c = json.load(f)
    rows = cell_metrics(workdir)
    if not rows:
        return False
    replayed = replay_schedule([r["val_loss"] for r in rows], lr_factor=c["lr_factor"], lr_patience=c["lr_patience"],
                               min_lr_scale=c["min_lr_scale"], plateau_warmup=plateau_warmup)  # fmt: skip
    return not np.allclose([r["lr"] / c["learning_rate"] for r in rows], replayed, rtol=1e-6, atol=0)


def amend_settings(root: str, base: Config, *, why: str, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Change the root's base config in fields a run may resume with (``Config.resumable_fields``:
    the stopping rules, the epoch cap, ...), recorded in ``scaling.json`` "amendments" with ``why``.

    Cells already done keep what they were trained with (their config.json says so), except:

    - a cell whose logged learning rates a changed ``plateau_warmup`` would change (replayed from
      its validation losses, :func:`_schedule_changes`) cannot be continued: it is *restarted*, its
      folder moved to ``<cell>.superseded`` (metrics, config and results kept; its checkpoints
      deleted) and trained afresh by the next grid run; this holds for cells in progress too;
    - a done cell whose run *stopped because of* a changed field (results.json "stopped",
      :data:`STOPPED_BY`) is *reopened*: its results.json and scale_eval.json renamed
      ``*.superseded.json`` (kept), and the next grid run resumes it from its checkpoints.

    Returns:
        the amendment: {"when", "why", "changed": {field: [old, new]}, "reopened": [bin/cell],
        "restarted": [bin/cell]}.
    """
    path = os.path.join(root, SETTINGS)
    with locked(path):  # a grid run starting meanwhile must see the amended base
        with open(path) as f:
            settings = json.load(f)
        new = json.loads(base.to_json())
        changed = {k: [settings["base"].get(k), v] for k, v in new.items() if settings["base"].get(k) != v}
        frozen = sorted(set(changed) - Config.resumable_fields())
        if frozen:
            raise ValueError(f"{path}: {frozen} cannot change on a root with trained cells (only resumable fields can)")
        if not changed:
            raise ValueError(f"{path}: the base config is already this one; nothing to amend")
        reopened, restarted = [], []
        for b in _bin_dirs(root):
            for name in sorted(os.listdir(os.path.join(root, b))):
                cell = os.path.join(root, b, name)
                if not os.path.exists(os.path.join(cell, "config.json")) or name.endswith(RESTARTED):
                    continue
                if "plateau_warmup" in changed and _schedule_changes(cell, new["plateau_warmup"]):
                    shutil.rmtree(os.path.join(cell, "checkpoints"), ignore_errors=True)
                    for lock in glob.glob(os.path.join(cell, "study*")):
                        os.remove(lock)  # a stale lock or failure record of the superseded run
                    os.replace(cell, cell + RESTARTED)
                    restarted.append(f"{b}/{name}")
                    log(f"restarting {b}/{name}: the warm-up changes its learning rates")
                    continue
                results = os.path.join(cell, "results.json")
                if not os.path.exists(results):
                    continue
                with open(results) as f:
                    stopped = json.load(f).get("stopped")
                if set(STOPPED_BY.get(stopped, ())) & set(changed):
                    for done in (results, os.path.join(root, b, name, EVAL)):
                        if os.path.exists(done):
                            os.replace(done, done.removesuffix(".json") + SUPERSEDED)
                    reopened.append(f"{b}/{name}")
                    log(f"reopened {b}/{name} (it stopped by {stopped})")
        amendment = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "why": why, "changed": changed,
                     "reopened": reopened, "restarted": restarted}  # fmt: skip
        settings["base"] = new
        settings["amendments"] = settings.get("amendments", []) + [amendment]
        write_atomic(path, json.dumps(settings, indent=1))
        return amendment


def reevaluate(
    root: str, paths: dict[str, str], *, require: Sequence[str] = ("k_probe",), log: Callable[[str], None] = print
) -> list[str]:
    """Evaluate again every trained cell under ``root`` whose ``scale_eval.json`` is missing or
    lacks a column of ``require`` on some geometry (evaluations older than those columns; same
    seed, so the columns they had come out the same). Returns the cells redone, 'bin/name'."""
    redone, tests = [], {}
    for b in _bin_dirs(root):
        for name in sorted(os.listdir(os.path.join(root, b))):
            workdir = os.path.join(root, b, name)
            _, _, seed = name.rpartition("-s")
            if not seed.isdigit() or not os.path.exists(os.path.join(workdir, "results.json")):
                continue
            path = os.path.join(workdir, EVAL)
            if os.path.exists(path):
                with open(path) as f:
                    rows = json.load(f)["geometries"]
                if all(k in g for g in rows for k in require):
                    continue
            if b not in tests:
                tests[b] = bin_test_set(paths, b)
            evaluate_cell(workdir, tests[b], seed=int(seed))
            redone.append(f"{b}/{name}")
            log(f"re-evaluated {b}/{name}")
    return redone


def _bin_dirs(root: str) -> list[str]:
    """The size-bin folders under ``root``, small to large (other folders, e.g. plots/, are not bins)."""
    bins = [d for d in os.listdir(root) if re.fullmatch(r"\d+-\d+", d) and os.path.isdir(os.path.join(root, d))]
    return sorted(bins, key=bin_low)


def _bins_of(done: dict[tuple[str, str], Any]) -> list[str]:
    return sorted({b for b, _ in done}, key=bin_low)


def _cells_done(root: str) -> dict[tuple[str, str], dict[int, dict]]:
    """{(bin, key): {seed: scale_eval.json}} of the evaluated cells under ``root``."""
    out: dict[tuple[str, str], dict[int, dict]] = {}
    for b in _bin_dirs(root):
        for name in sorted(os.listdir(os.path.join(root, b))):
            path = os.path.join(root, b, name, EVAL)
            key, _, seed = name.rpartition("-s")
            if os.path.exists(path) and seed.isdigit():
                with open(path) as f:
                    out.setdefault((b, key), {})[int(seed)] = json.load(f)
    return out


def _by_scheme(done: dict[tuple[str, str], dict[int, dict]]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for (_, key), seeds in done.items():
        out.setdefault(key, []).extend(g for s in seeds.values() for g in s["geometries"])
    return out


def geometries_by_scheme(root: str) -> dict[str, list[dict]]:
    """{cell key: every evaluated test geometry's row (errors, trace, variances) over bins and seeds}."""
    return _by_scheme(_cells_done(root))


def variance_summary(geoms: Sequence[dict]) -> dict[str, float]:
    """Geometric means over test geometries: each family's one-probe variance over the Gaussian one
    (closed forms), over tr(A)^2 (the relative variance of the loss estimate), and the Monte Carlo
    variance over the closed form (1 = agreement)."""
    out = {"n_geometries": len(geoms)}
    for fam in FAMILIES:
        if fam != "gaussian":
            out[f"{fam}_over_gaussian"] = float(
                stats.gmean([g["formula"][fam] / g["formula"]["gaussian"] for g in geoms])
            )
        out[f"{fam}_relative"] = float(stats.gmean([g["formula"][fam] / g["trace"] ** 2 for g in geoms]))
        out[f"{fam}_empirical_over_formula"] = float(
            stats.gmean([g["empirical"][fam] / g["formula"][fam] for g in geoms])
        )
    _, ratio = orthogonal_over_gaussian_k(geoms)
    if ratio:
        out["orthogonal_over_gaussian_k"] = float(stats.gmean(ratio))
    return out


def orthogonal_over_gaussian_k(geoms: Sequence[dict]) -> tuple[list[int], list[float]]:
    """(N, closed-form variance of the K-probe orthogonal estimate over the K i.i.d. Gaussian one) of
    the geometries evaluated with the K-probe columns (evaluations before them have none)."""
    kk = [g for g in geoms if "k_probe" in g]
    return [g["n_atoms"] for g in kk], [g["k_probe"]["orthogonal"] / g["k_probe"]["gaussian"] for g in kk]


PLATEAU_EXIT = 0.8  # a model has left its initial loss plateau once its train force loss is below this x epoch 1's


def plateau_exit(workdir: str, frac: float = PLATEAU_EXIT) -> int | None:
    """The first epoch whose train force loss is below ``frac`` times the first epoch's: where the
    model leaves the initial loss plateau every model of the study starts on (longer for larger
    molecules: the reason for ``Config.plateau_warmup``). None: it never does, or nothing is logged."""
    rows = cell_metrics(workdir)
    if not rows:
        return None
    start = rows[0]["train_force_loss"]
    return next((r["epoch"] for r in rows if r["train_force_loss"] < frac * start), None)


def fit_exponent(n_atoms: Sequence[float], values: Sequence[float]) -> dict[str, float]:
    """Least-squares slope of log(values) against log(N) with its standard error, 95% interval and
    p-value of slope 0 (``scipy.stats.linregress``); those three are None with fewer than 3 points."""
    x, y = np.log(np.asarray(n_atoms, float)), np.log(np.asarray(values, float))
    fit = stats.linregress(x, y)
    out = {"exponent": float(fit.slope), "stderr": None, "ci95": None, "p_value": None, "n_points": len(x)}
    if len(x) > 2:
        half = stats.t.ppf(0.975, len(x) - 2) * fit.stderr
        out |= {"stderr": float(fit.stderr), "ci95": [float(fit.slope - half), float(fit.slope + half)],
                "p_value": float(fit.pvalue)}  # fmt: skip
    return out


def gap_trend(done: dict[tuple[str, str], dict[int, dict]], ka: str, kb: str) -> dict[str, Any] | None:
    """Does cell key b's advantage over a change with N? For every (bin, seed) both have, the ratio
    b / a of the test RMSE (E, F, H); its exponent of N (:func:`fit_exponent` against the bin's mean
    atoms: 0 = a constant gap, < 0 = b pulls away from a as molecules grow; ``p_value`` tests
    exponent 0) and per bin the geometric mean ratio. None when fewer than 2 bins have both."""
    points = {}  # bin -> [(mean atoms, {quantity: ratio})] over the seeds both have
    for b in _bins_of(done):
        sa, sb = done.get((b, ka), {}), done.get((b, kb), {})
        for s in sorted(set(sa) & set(sb)):
            points.setdefault(b, []).append((sa[s]["mean_atoms"], {q: sb[s][q] / sa[s][q] for q in QUANTITIES}))
    if len(points) < 2:
        return None
    flat = [p for pts in points.values() for p in pts]
    n = [m for m, _ in flat]
    by_bin = {b: {"mean_atoms": pts[0][0], "n_seeds": len(pts),
                  **{q: float(stats.gmean([r[q] for _, r in pts])) for q in QUANTITIES}}
              for b, pts in points.items()}  # fmt: skip
    fits = {q: fit_exponent(n, [r[q] for _, r in flat]) for q in QUANTITIES}
    pooled = {q: pooled_ratio([r[q] for _, r in flat]) for q in QUANTITIES}
    return {"n_bins": len(points), "by_bin": by_bin, **fits, "pooled": pooled}


def pooled_ratio(ratios: Sequence[float]) -> dict[str, Any]:
    """Geometric mean of ratios b / a over (bin, seed) pairs, its 95% interval and the p-value of
    ratio 1 (one-sample t-test of the log ratios, `scipy.stats.ttest_1samp`): is b better or worse
    than a over all sizes together? Interval and p are None with fewer than 2 ratios."""
    logs = np.log(np.asarray(ratios, float))
    out = {"ratio": float(np.exp(logs.mean())), "ci95": None, "p_value": None, "n_points": len(logs)}
    if len(logs) > 1 and np.std(logs) > 0:
        half = stats.t.ppf(0.975, len(logs) - 1) * stats.sem(logs)
        out |= {"ci95": [float(np.exp(logs.mean() - half)), float(np.exp(logs.mean() + half))],
                "p_value": float(stats.ttest_1samp(logs, 0.0).pvalue)}  # fmt: skip
    return out


def aggregate(root: str) -> dict[str, Any]:
    """Per bin and cell key: mean/std over seeds of E, F, H RMSE; per bin and pair of
    :data:`PAIRS`: paired t-test over seeds of the Hessian (and E, F) RMSE; per probe family:
    exponents of the estimator variance against N over every evaluated test geometry (closed form
    and Monte Carlo), per training scheme, and per bin their :func:`variance_summary`; per pair of
    :data:`PAIRS` seen in >= 2 bins: the trend of its RMSE ratio with N (:func:`gap_trend`,
    "gap_trends"); per cell and seed the :func:`plateau_exit` epoch; written to ``<root>/aggregate.json``."""
    done = _cells_done(root)
    bins: dict[str, dict] = {}
    for (b, key), seeds in done.items():
        entry = bins.setdefault(b, {"cells": {}, "pairs": {}})
        entry["mean_atoms"] = next(iter(seeds.values()))["mean_atoms"]
        entry["cells"][key] = {"n_seeds": len(seeds), **{q: seed_stats({s: r[q] for s, r in seeds.items()})
                                                         for q in QUANTITIES}}  # fmt: skip
        entry["cells"][key]["plateau_exit"] = {s: plateau_exit(os.path.join(root, b, f"{key}-s{s}")) for s in seeds}
        entry.setdefault("variance", {})[key] = variance_summary([g for r in seeds.values() for g in r["geometries"]])
    for b in bins:
        for ka, kb in PAIRS:
            sa, sb = done.get((b, ka), {}), done.get((b, kb), {})
            common = sorted(set(sa) & set(sb))
            if len(common) < 2:
                continue
            pair = {"n_seeds": len(common)}
            for q in QUANTITIES:
                st = paired({s: sb[s][q] for s in common}, {s: sa[s][q] for s in common})  # b against a
                pair[q] = {"change_pct": st["rel_diff_pct"], "p_value": st["p_value"]}
            bins[b]["pairs"][f"{kb} vs {ka}"] = pair
    exponents: dict[str, dict] = {}
    for key, geoms in _by_scheme(done).items():
        n = [g["n_atoms"] for g in geoms]
        ex = {"trace": fit_exponent(n, [g["trace"] for g in geoms])}
        for fam in FAMILIES:
            ex[f"{fam}_formula"] = fit_exponent(n, [g["formula"][fam] for g in geoms])
            ex[f"{fam}_empirical"] = fit_exponent(n, [g["empirical"][fam] for g in geoms])
            ex[f"{fam}_relative"] = fit_exponent(n, [g["formula"][fam] / g["trace"] ** 2 for g in geoms])
        ex["onehot_over_gaussian"] = fit_exponent(n, [g["formula"]["onehot"] / g["formula"]["gaussian"] for g in geoms])
        n_k, ratio = orthogonal_over_gaussian_k(geoms)
        if len(ratio) > 2:
            ex["orthogonal_over_gaussian_k"] = fit_exponent(n_k, ratio)
        exponents[key] = ex
    trends = {f"{kb} vs {ka}": t for ka, kb in PAIRS if (t := gap_trend(done, ka, kb))}
    out = {"bins": dict(sorted(bins.items(), key=lambda kv: bin_low(kv[0]))), "exponents": exponents,
           "gap_trends": trends}  # fmt: skip
    write_atomic(os.path.join(root, "aggregate.json"), json.dumps(out, indent=1))
    return out
