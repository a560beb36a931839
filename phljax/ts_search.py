"""The TS search benchmark: do a model's forces and Hessian find the DFT transition states?

For every reaction of the bundled set and every model, Sella (`order=1`, internal coordinates, as
the data pipeline runs it) searches a first-order saddle of the model from

- ``guess``: the pipeline's own TS guess, the start of its DFT saddle search (`Start`): the
  reaction file's TS frame when it has one, else `neb.npz["guess"]` (the HF/3-21G climbing-image
  NEB saddle refined by Sella at HF/3-21G) or, with `Settings.guess="climbing"`, the raw climbing
  image `neb.npz["climbing"]`;
- ``perturbed-k``: the DFT TS (`chon_reactions-RTP.h5`, point 'ts') displaced by a seeded random
  vector, translations and rotations removed, of RMS between `rms_range` (evenly spaced).

Each start runs in two Hessian modes:

- ``model``: the model's analytic Hessian (`PHLCalculator.get_hessian`) at the start and again
  after every step. Sella 2.6 recomputes the Hessian at a step when its counter of steps since the
  last one, -1 after the initial Hessian, is >= `diag_every_n`; `diag_every_n=-1` therefore gives a
  Hessian at every step including the first (`n_hessians == steps + 1`; 0 would skip step 1).
  Sella's IRC gets the same `hessian_function` (it uses it at the TS only).
- ``sella``: no Hessian from the model: Sella's own iterative (finite-difference Davidson)
  eigensolver and quasi-Newton updates, in the search and in the IRC.

From the saddle found, Sella's IRC runs both ways (step `irc_dx` amu^1/2 A, at most `irc_steps`
per branch, a branch ending once its max force is below `irc_fmax`, as in the pipeline), and each
end is relaxed with BFGS on the model. An attempt records (`run_attempt`):

- `converged`: max force below `fmax` (eV/A) within `max_steps` Sella steps (and `max_wall_s`);
- `n_imaginary`: imaginary frequencies of the model Hessian at the saddle (mass weighted,
  translations and rotations projected out: `harmonic_analysis(...).n_imaginary(imag_tol_cm)`);
  `one_imaginary` is that count == 1;
- `rmsd`: aligned RMSD to the DFT TS (Kabsch, same atom order), `rmsd_ok` below `rmsd_tol`;
- `irc_connects`: the relaxed IRC ends are the reaction's reactant and product (the DFT minima of
  the RTP file), decided as the pipeline does (`checks.match_endpoint`: bond graphs, or RMSD for
  conformers);
- `success`: all four.

Attempts are appended as JSON lines to `<out>/attempts.jsonl` the moment they finish, keyed by
(model, reaction, start, mode): `run_benchmark` skips the finished ones, so a stopped benchmark
resumes. `<out>/settings.json` pins the settings (a different setting needs a new `out`).
`<out>/ts_search.json` (settings, models, attempts, summary) and `<out>/ts_search.md` (tables) are
rewritten at the end of every model.

Units: positions Angstrom, energies eV, forces eV/A, Hessians eV/A^2, frequencies cm^-1.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
import zlib
from collections.abc import Callable, Sequence

import jax
import numpy as np
from ase import Atoms
from ase.optimize import BFGS

from phljax.calculator import PHLCalculator
from phljax.config import Config
from phljax.data import bundled_path, read_h5
from phljax.datagen.reactions.checks import ENDPOINT_RMSD, IMAG_TOL_CM, aligned_rmsd, match_endpoint
from phljax.datagen.reactions.spec import read_reaction
from phljax.losses import SCHEMES
from phljax.optional import import_sella
from phljax.potential import Potential
from phljax.study import HVP_PROBES, SCHEME_SLUGS, Cell
from phljax.vibrations import harmonic_analysis, rigid_body_projector

__all__ = [
    "Settings",
    "Reference",
    "Start",
    "Model",
    "MODES",
    "load_references",
    "make_starts",
    "model_from_workdir",
    "study_models",
    "follow_irc",
    "relax",
    "run_attempt",
    "run_benchmark",
    "read_attempts",
    "summarize",
    "render_tables",
]

log = logging.getLogger("phljax.ts_search")

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REACTIONS_DIR = os.path.join(_REPO, "data", "reactions")  # atom-mapped reactant/product(/TS guess) xyz files
CACHE_DIR = os.path.join(_REPO, "data", "dft_cache", "reactions")  # the pipeline's cache: neb.npz per reaction
MODES = ("model", "sella")  # Hessian modes: the model's at every step | Sella's own updates
START_KINDS = ("guess", "perturbed")
EVERY_STEP = -1  # Sella's diag_every_n for a fresh Hessian at every step (see the module docstring)
ATTEMPTS, SETTINGS, SUMMARY, TABLES = "attempts.jsonl", "settings.json", "ts_search.json", "ts_search.md"


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that decides an attempt's result (pinned in `<out>/settings.json`).

    Attributes:
        max_steps: Sella steps per search.
        fmax: convergence of the search, max force eV/A.
        perturbations: perturbed DFT-TS starts per reaction.
        rms_range: (low, high) RMS displacement of the perturbed starts, Angstrom; k starts are
            evenly spaced from low to high (one start: their mean).
        seed: seed of the perturbations (the same starts for every model).
        guess: "pipeline" (the guess the pipeline's DFT search started from) or "climbing"
            (the NEB's climbing image; the file's frame where a reaction has no NEB).
        modes: Hessian modes to run, of `MODES`.
        rmsd_tol: a saddle within this aligned RMSD of the DFT TS is the DFT TS, Angstrom.
        imag_tol_cm: frequencies below minus this count as imaginary, cm^-1 (the pipeline's 20).
        irc_dx, irc_steps, irc_fmax: Sella IRC step (amu^1/2 A), steps per branch, and the max
            force (eV/A) that ends a branch: the pipeline's.
        relax_fmax, relax_steps: BFGS relaxation of the IRC ends (eV/A, steps).
        endpoint_rmsd: `match_endpoint`'s RMSD for conformers, Angstrom (the pipeline's).
        max_wall_s: wall-time budget of one attempt (search, IRC and relaxations), seconds;
            checked after every optimiser step.
    """

    max_steps: int = 200
    fmax: float = 0.01
    perturbations: int = 3
    rms_range: tuple[float, float] = (0.1, 0.3)
    seed: int = 0
    guess: str = "pipeline"
    modes: tuple[str, ...] = MODES
    rmsd_tol: float = 0.1
    imag_tol_cm: float = IMAG_TOL_CM
    irc_dx: float = 0.15
    irc_steps: int = 40
    irc_fmax: float = 0.1
    relax_fmax: float = 0.01
    relax_steps: int = 300
    endpoint_rmsd: float = ENDPOINT_RMSD
    max_wall_s: float = 300.0

    def __post_init__(self):
        object.__setattr__(self, "rms_range", tuple(float(x) for x in self.rms_range))
        object.__setattr__(self, "modes", tuple(self.modes))
        lo, hi = self.rms_range
        if not (len(self.rms_range) == 2 and 0 < lo <= hi):
            raise ValueError(f"rms_range must be (low, high) with 0 < low <= high Angstrom, got {self.rms_range}")
        if self.guess not in ("pipeline", "climbing"):
            raise ValueError(f"guess must be 'pipeline' or 'climbing', got {self.guess!r}")
        if not self.modes or not set(self.modes) <= set(MODES) or len(set(self.modes)) != len(self.modes):
            raise ValueError(f"modes must be distinct values of {MODES}, got {self.modes}")
        for name in ("max_steps", "irc_steps", "relax_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.perturbations < 0:
            raise ValueError(f"perturbations must be >= 0, got {self.perturbations}")
        for name in ("fmax", "rmsd_tol", "irc_dx", "irc_fmax", "relax_fmax", "max_wall_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclasses.dataclass(frozen=True)
class Reference:
    """One reaction's DFT reference: TS, reactant and product minima, and the TS guesses.

    Attributes:
        id: reaction id.
        numbers: [N] atomic numbers (the same atom order everywhere).
        ts, reactant, product: [N, 3] Angstrom, the DFT geometries of `chon_reactions-RTP.h5`.
        guesses: {"pipeline": [N, 3], "climbing": [N, 3]} Angstrom (see `Settings.guess`).
        guess_source: {"pipeline": ..., "climbing": ...}: where each came from.
    """

    id: str
    numbers: np.ndarray
    ts: np.ndarray
    reactant: np.ndarray
    product: np.ndarray
    guesses: dict
    guess_source: dict


@dataclasses.dataclass(frozen=True)
class Start:
    """One start of a search: `name` is "guess" or "perturbed-k"; `rmsd` its aligned RMSD to the DFT TS."""

    reaction: str
    name: str
    kind: str  # one of START_KINDS
    positions: np.ndarray  # [N, 3] Angstrom
    rmsd: float  # Angstrom
    source: str  # what it is (guess source, or the requested RMS)


@dataclasses.dataclass(frozen=True)
class Model:
    """A trained run: `key` identifies it in the attempt log, `label` is its table row (the scheme)."""

    key: str
    label: str
    workdir: str


# --- references and starts ----------------------------------------------------------------------------------------


def load_references(
    rtp_path: str | None = None,
    reactions_dir: str = REACTIONS_DIR,
    cache_dir: str = CACHE_DIR,
    reactions: Sequence[str] | None = None,
) -> list[Reference]:
    """The DFT references of the reactions with a TS in the RTP file (sorted by id).

    Args:
        rtp_path: an RTP file (default: the bundled `chon_reactions-RTP.h5`).
        reactions_dir: where `<reaction>.xyz` lives (a TS frame there is the pipeline's guess).
        cache_dir: the pipeline's cache (`<reaction>/neb.npz`).
        reactions: ids to keep (default: all).

    Raises:
        ValueError: an id in `reactions` that the file lacks, a reaction without reactant or
            product, a reaction with neither a TS frame nor a `neb.npz`.
    """
    rtp = read_h5(rtp_path or bundled_path("chon_reactions-RTP.h5"))
    points: dict[str, dict] = {}
    for m in rtp:
        points.setdefault(m.meta["reaction"], {})[m.meta["point"]] = m
    ids = sorted(r for r, p in points.items() if "ts" in p)
    if reactions is not None:
        missing = sorted(set(reactions) - set(ids))
        if missing:
            raise ValueError(f"reaction(s) {missing} have no TS in {rtp_path or 'the bundled RTP file'}; known: {ids}")
        ids = [r for r in ids if r in set(reactions)]
    out = []
    for rid in ids:
        p = points[rid]
        if not {"reactant", "product"} <= set(p):
            raise ValueError(f"reaction {rid}: the RTP file has points {sorted(p)}, needs reactant, product and ts")
        ts = p["ts"]
        guesses, sources = {}, {}
        xyz = os.path.join(reactions_dir, f"{rid}.xyz")
        file_guess = read_reaction(xyz).ts_guess if os.path.exists(xyz) else None
        neb_path = os.path.join(cache_dir, rid, "neb.npz")
        if file_guess is not None:  # the pipeline skips the NEB when the file has a TS frame
            guesses = {"pipeline": file_guess, "climbing": file_guess}
            sources = {"pipeline": f"{xyz} frame 2", "climbing": f"{xyz} frame 2 (no NEB)"}
        elif os.path.exists(neb_path):
            with np.load(neb_path) as neb:
                guesses = {"pipeline": np.array(neb["guess"], np.float64), "climbing": np.array(neb["climbing"])}
            sources = {"pipeline": f"{neb_path} guess", "climbing": f"{neb_path} climbing"}
        else:
            raise ValueError(f"reaction {rid}: no TS guess: neither {xyz} has a TS frame nor {neb_path} exists")
        for k, g in guesses.items():
            if np.shape(g) != ts.positions.shape:
                raise ValueError(f"reaction {rid}: {sources[k]} has shape {np.shape(g)}, the TS {ts.positions.shape}")
        out.append(
            Reference(
                id=rid,
                numbers=np.asarray(ts.numbers),
                ts=np.asarray(ts.positions, np.float64),
                reactant=np.asarray(p["reactant"].positions, np.float64),
                product=np.asarray(p["product"].positions, np.float64),
                guesses={k: np.asarray(v, np.float64) for k, v in guesses.items()},
                guess_source=sources,
            )
        )
    return out


def _rms_values(settings: Settings) -> list[float]:
    lo, hi = settings.rms_range
    k = settings.perturbations
    return [0.5 * (lo + hi)] if k == 1 else np.linspace(lo, hi, k).tolist()


def make_starts(ref: Reference, settings: Settings) -> list[Start]:
    """The guess and the `settings.perturbations` perturbed DFT TS starts of one reaction.

    A perturbation is a Gaussian vector with translations and rotations (about the centroid)
    projected out, scaled to the RMS over atoms sqrt(mean_i |d_i|^2); its random stream is keyed
    by (seed, reaction id, k), so every model gets the same starts whatever else runs.
    """
    guess = ref.guesses[settings.guess]
    starts = [Start(ref.id, "guess", "guess", guess, aligned_rmsd(guess, ref.ts), ref.guess_source[settings.guess])]
    n = len(ref.numbers)
    p, _ = rigid_body_projector(ref.ts, np.ones(n))  # [3N, 3N]; unit masses: plain Cartesian
    for k, rms in enumerate(_rms_values(settings)):
        rng = np.random.default_rng([settings.seed, zlib.crc32(ref.id.encode()), k])
        d = (p @ rng.normal(size=3 * n)).reshape(n, 3)  # [N, 3], no rigid-body part
        d *= rms / np.sqrt((d**2).sum(-1).mean())
        r = ref.ts + d
        starts.append(Start(ref.id, f"perturbed-{k}", "perturbed", r, aligned_rmsd(r, ref.ts), f"rms {rms:.3f} A"))
    return starts


# --- models -------------------------------------------------------------------------------------------------------


def _scheme_label(config: Config, results: dict | None) -> str:
    label = (results or {}).get("scheme") or SCHEMES[config.probe]
    return label + (f" ({config.probe_mode})" if config.probe in HVP_PROBES else "")


def model_from_workdir(workdir: str) -> Model:
    """A `Model` of the training run in `workdir`, labelled by its scheme (results.json, else config.json).

    Raises:
        FileNotFoundError: no config.json in `workdir`.
    """
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found; is {workdir!r} the work directory of a training run?")
    with open(path) as f:
        config = Config.from_json(f.read())
    results = None
    if os.path.isfile(os.path.join(workdir, "results.json")):
        with open(os.path.join(workdir, "results.json")) as f:
            results = json.load(f)
    return Model(key=os.path.realpath(workdir), label=_scheme_label(config, results), workdir=workdir)


def study_models(root: str, protocol: str, seed: int) -> list[Model]:
    """Every finished run (results.json written) of `protocol` and `seed` in a study root, in the
    study's scheme order (E-F, E-F-HVP one-hot, E-F-HVP random, E-F-H; randomized before fixed).

    Raises:
        FileNotFoundError: `<root>/<protocol>` does not exist.
    """
    base = os.path.join(root, protocol)
    if not os.path.isdir(base):
        raise FileNotFoundError(f"{base}: no such study protocol directory")
    cells = []
    for name in sorted(os.listdir(base)):
        cell = Cell.parse(protocol, name)
        if cell and cell.seed == seed and os.path.isfile(os.path.join(base, name, "results.json")):
            cells.append(cell)
    order = list(SCHEME_SLUGS)
    cells.sort(key=lambda c: (order.index(c.probe), c.regime or ""))
    return [model_from_workdir(c.workdir(root)) for c in cells]


def _unique_labels(models: Sequence[Model]) -> list[Model]:
    """Models whose labels repeat get their run's directory name appended."""
    labels = [m.label for m in models]
    return [
        dataclasses.replace(m, label=f"{m.label} [{os.path.basename(os.path.normpath(m.workdir))}]")
        if labels.count(m.label) > 1
        else m
        for m in models
    ]


# --- one attempt --------------------------------------------------------------------------------------------------


class _OutOfTime(TimeoutError):
    """The attempt's wall-time budget ran out (raised from an optimiser observer)."""


class _BranchAtMinimum(Exception):
    """An IRC branch reached a minimum (max force below irc_fmax)."""


def _deadline_observer(deadline: float) -> Callable[[], None]:
    def check():
        if time.perf_counter() > deadline:
            raise _OutOfTime

    return check


def _max_force(atoms: Atoms) -> float:
    return float(np.linalg.norm(atoms.get_forces(), axis=1).max())


def follow_irc(
    calc: PHLCalculator,
    numbers,
    ts: np.ndarray,
    *,
    hessian_function: Callable[[Atoms], np.ndarray] | None = None,
    settings: Settings = Settings(),  # noqa: B008 (frozen)
    deadline: float = math.inf,
) -> dict:
    """Sella's IRC both ways from a saddle, as the data pipeline runs it, on the model.

    A branch ends at its first point past the second whose max force is below `settings.irc_fmax`
    (Sella's own test also wants a positive lowest eigenvalue of its updated Hessian, which carries
    the TS's negative one and idles at the minimum), after `settings.irc_steps` steps, or where
    Sella's inner loop fails (the branch ends at its last good point, as in the pipeline).

    Args:
        calc: the model's calculator.
        numbers: [N] atomic numbers.
        ts: [N, 3] Angstrom, the saddle.
        hessian_function: the Hessian Sella starts from at the TS (e.g. `calc.get_hessian`;
            None: Sella's own iterative eigensolver).
        settings: `irc_dx` (amu^1/2 A), `irc_steps`, `irc_fmax` (eV/A).
        deadline: `time.perf_counter()` value after which it stops (raises `TimeoutError`).

    Returns:
        {"forward" | "reverse": {"path": [M, N, 3] Angstrom (point 0 the TS), "energies": [M] eV,
        "stop": "minimum" | "steps" | "converged" | "inner_loop_failure"}}.
    """
    sella = import_sella()
    inner_failure = sella.optimize.irc.IRCInnerLoopConvergenceFailure
    atoms = Atoms(numbers=numbers, positions=ts)
    atoms.calc = calc
    paths: dict[str, list] = {"forward": [], "reverse": []}
    energies: dict[str, list] = {"forward": [], "reverse": []}
    current = {"dir": "forward"}

    def record():
        branch = paths[current["dir"]]
        branch.append(atoms.positions.copy())
        energies[current["dir"]].append(atoms.get_potential_energy())
        if len(branch) >= 3 and _max_force(atoms) < settings.irc_fmax:  # point 0 is the TS: two steps at least
            raise _BranchAtMinimum
        if time.perf_counter() > deadline:
            raise _OutOfTime

    out = {}
    with jax.enable_x64(True):
        kwargs = {} if hessian_function is None else {"hessian_function": hessian_function}
        irc = sella.IRC(atoms, dx=settings.irc_dx, logfile=None, **kwargs)
        irc.attach(record)
        for direction in ("forward", "reverse"):
            current["dir"] = direction
            stop = "steps"
            try:
                if irc.run(fmax=settings.irc_fmax, steps=settings.irc_steps, direction=direction):
                    stop = "converged"
            except _BranchAtMinimum:
                stop = "minimum"
            except inner_failure:
                stop = "inner_loop_failure"
            path = np.stack(paths[direction]) if paths[direction] else np.asarray(ts)[None]
            out[direction] = {"path": path, "energies": np.array(energies[direction]), "stop": stop}
    return out


def relax(
    calc: PHLCalculator,
    numbers,
    positions: np.ndarray,
    settings: Settings = Settings(),  # noqa: B008 (frozen)
    deadline: float = math.inf,
) -> dict:
    """BFGS minimisation on the model to `settings.relax_fmax` (eV/A) in `settings.relax_steps` steps
    (raises `TimeoutError` after `deadline`, a `time.perf_counter()` value).

    Returns:
        {"positions": [N, 3] Angstrom, "energy": eV, "converged": bool, "steps": int}.
    """
    atoms = Atoms(numbers=numbers, positions=positions)
    atoms.calc = calc
    opt = BFGS(atoms, logfile=None)
    opt.attach(_deadline_observer(deadline))
    converged = bool(opt.run(fmax=settings.relax_fmax, steps=settings.relax_steps))
    return {
        "positions": atoms.positions.copy(),
        "energy": float(atoms.get_potential_energy()),
        "converged": converged,
        "steps": int(opt.nsteps),
    }


def run_attempt(calc: PHLCalculator, ref: Reference, start: Start, mode: str, settings: Settings) -> dict:
    """One search from `start` in Hessian `mode`, its IRC and its checks; a JSON-ready record.

    Never raises for a failed search: `status` is "converged", "not_converged" (`max_steps`
    used up), "timeout" (`max_wall_s` used up) or "error" (a Sella or model exception), with
    `error` naming the phase (search, analysis, irc) and the message; a timeout or error after
    the search converged leaves `converged` true and `irc_connects` false. Fields: see the
    module docstring; also `steps`, `n_hessians` (model Hessians in the search: steps + 1 in
    mode "model", more when Sella rebuilds its internal coordinates; 0 in mode "sella") and
    `n_force_calls` (model energy-force calls of the whole attempt), `wall_s`,
    `fmax_final` (eV/A), `energy_eV` (model, at the saddle), `frequencies_cm` (the two lowest),
    `irc` {direction: points, stop, end ("reactant" | "product" | null), relax_steps}, `ts`
    (the saddle, [N, 3] A as lists).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    sella = import_sella()
    t0 = time.perf_counter()
    deadline = t0 + settings.max_wall_s
    counts0 = dict(calc.counts)
    hessians = {"n": 0}

    def hessian_function(atoms):  # [3N, 3N] eV/A^2
        hessians["n"] += 1
        return calc.get_hessian(atoms)

    hf = hessian_function if mode == "model" else None
    record = {
        "reaction": ref.id,
        "start": start.name,
        "start_kind": start.kind,
        "start_rmsd": start.rmsd,
        "mode": mode,
        "status": "error",
        "error": None,
        "converged": False,
        "steps": 0,
        "n_imaginary": None,
        "one_imaginary": False,
        "rmsd": None,
        "rmsd_ok": False,
        "irc": None,
        "irc_connects": False,
        "success": False,
    }
    atoms = Atoms(numbers=ref.numbers, positions=start.positions)
    atoms.calc = calc
    opt, phase = None, "search"
    try:
        with jax.enable_x64(True):
            kwargs = {} if hf is None else {"hessian_function": hf, "diag_every_n": EVERY_STEP}
            opt = sella.Sella(atoms, order=1, internal=True, logfile=None, **kwargs)
            opt.attach(_deadline_observer(deadline))
            converged = bool(opt.run(fmax=settings.fmax, steps=settings.max_steps))
        record.update(status="converged" if converged else "not_converged", converged=converged)
        record["n_hessians"] = hessians["n"]  # of the search (the IRC takes one more at the TS)
        phase = "analysis"
        ts = atoms.positions.copy()
        record["fmax_final"] = _max_force(atoms)
        record["energy_eV"] = float(atoms.get_potential_energy())
        record["ts"] = ts.tolist()
        harmonic = harmonic_analysis(ref.numbers, ts, calc.get_hessian(atoms))  # standard atomic weights
        n_imag = harmonic.n_imaginary(settings.imag_tol_cm)
        record.update(n_imaginary=n_imag, one_imaginary=n_imag == 1, frequencies_cm=harmonic.frequencies[:2].tolist())
        rmsd = aligned_rmsd(ts, ref.ts)
        record.update(rmsd=rmsd, rmsd_ok=rmsd < settings.rmsd_tol)
        if converged:
            phase = "irc"
            branches = follow_irc(calc, ref.numbers, ts, hessian_function=hf, settings=settings, deadline=deadline)
            ends, record["irc"] = {}, {}
            for direction, branch in branches.items():
                relaxed = relax(calc, ref.numbers, branch["path"][-1], settings, deadline)
                ends[direction] = match_endpoint(
                    ref.numbers, relaxed["positions"], ref.reactant, ref.product, settings.endpoint_rmsd
                )
                record["irc"][direction] = {
                    "points": len(branch["path"]),
                    "stop": branch["stop"],
                    "end": ends[direction],
                    "relax_steps": relaxed["steps"],
                    "relax_converged": relaxed["converged"],
                }
            record["irc_connects"] = sorted(e or "" for e in ends.values()) == ["product", "reactant"]
    except _OutOfTime:
        record.update(status="timeout", error=f"{phase}: wall-time budget of {settings.max_wall_s:g} s used up")
    except Exception as err:  # a Sella breakdown or a model refusal (e.g. non-finite positions): recorded
        record.update(status="error", error=f"{phase}: {type(err).__name__}: {err}")
    if phase == "search":  # the search itself did not finish: nothing converged
        record["converged"] = False
    record["steps"] = int(opt.nsteps) if opt is not None else 0
    record["success"] = bool(record["converged"] and record["one_imaginary"] and record["rmsd_ok"])
    record["success"] = bool(record["success"] and record["irc_connects"])
    record.setdefault("n_hessians", hessians["n"])
    record["n_force_calls"] = calc.counts["energy_forces"] - counts0["energy_forces"]
    record["wall_s"] = time.perf_counter() - t0
    return record


# --- the benchmark ------------------------------------------------------------------------------------------------


def _key(record: dict) -> tuple[str, str, str, str]:
    return record["model"], record["reaction"], record["start"], record["mode"]


def read_attempts(out: str) -> list[dict]:
    """The finished attempts in `<out>/attempts.jsonl` (a torn last line, from a kill mid-write, is skipped)."""
    path = os.path.join(out, ATTEMPTS)
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s:%d: not a JSON line (an interrupted write?); skipped", path, i + 1)
    return records


def _pin_settings(out: str, settings: Settings) -> None:
    path = os.path.join(out, SETTINGS)
    now = settings.to_json()
    if os.path.exists(path):
        with open(path) as f:
            before = json.load(f)
        diff = sorted(k for k in set(now) | set(before) if now.get(k) != before.get(k))
        if diff:
            raise ValueError(
                f"{path}: this benchmark ran with other settings ({', '.join(f'{k}={before.get(k)}' for k in diff)}; "
                f"now {', '.join(f'{k}={now.get(k)}' for k in diff)}); use another --out to change them"
            )
        return
    with open(path + ".tmp", "w") as f:
        json.dump(now, f, indent=1)
    os.replace(path + ".tmp", path)


def _append(out: str, record: dict) -> None:
    with open(os.path.join(out, ATTEMPTS), "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _write_outputs(out: str, settings: Settings, models: Sequence[Model], records: list[dict], title: str) -> None:
    keys = {m.key for m in models}
    mine = [r for r in records if r["model"] in keys]
    summary = summarize(mine, models, settings)
    doc = {"settings": settings.to_json(), "models": [dataclasses.asdict(m) for m in models], "summary": summary}
    doc["attempts"] = mine
    for name, text in ((SUMMARY, json.dumps(doc, indent=1)), (TABLES, render_tables(summary, settings, title))):
        with open(os.path.join(out, name + ".tmp"), "w") as f:
            f.write(text)
        os.replace(os.path.join(out, name + ".tmp"), os.path.join(out, name))


def run_benchmark(
    models: Sequence[Model],
    settings: Settings = Settings(),  # noqa: B008 (frozen)
    out: str = "results/ts_search",
    *,
    references: Sequence[Reference] | None = None,
    title: str = "TS search",
    potential_for: Callable[[Model], Potential] | None = None,
) -> dict:
    """Run (or resume) every attempt of `models` x reactions x starts x modes; write the outputs.

    Args:
        models: the trained runs (`model_from_workdir`, `study_models`).
        settings: see `Settings`; pinned in `<out>/settings.json`.
        out: output directory (attempts.jsonl, settings.json, ts_search.json, ts_search.md).
        references: the reactions (default: `load_references()`, all 12 bundled ones).
        title: heading of the Markdown tables.
        potential_for: how to load a model (default `Potential.from_workdir(model.workdir)`).

    Returns:
        The summary (`summarize`) of the models' attempts.

    Raises:
        ValueError: `out` holds a benchmark with other settings; two models with the same key.
    """
    if len({m.key for m in models}) != len(models):
        raise ValueError(f"the same model is given twice: {[m.workdir for m in models]}")
    models = _unique_labels(models)
    references = load_references() if references is None else list(references)
    os.makedirs(out, exist_ok=True)
    _pin_settings(out, settings)
    records = read_attempts(out)
    done = {_key(r) for r in records}
    load = potential_for or (lambda m: Potential.from_workdir(m.workdir))
    for model in models:
        todo = [
            (ref, start, mode)
            for ref in references
            for start in make_starts(ref, settings)
            for mode in settings.modes
            if (model.key, ref.id, start.name, mode) not in done
        ]
        log.info("%s (%s): %d attempts to run", model.label, model.workdir, len(todo))
        if todo:
            calc = PHLCalculator(load(model))
            for ref, start, mode in todo:
                record = {"model": model.key, "label": model.label, **run_attempt(calc, ref, start, mode, settings)}
                _append(out, record)
                records.append(record)
                log.info(
                    "%s %s %s %s: %s, %d steps, %s imaginary, RMSD %s, IRC %s, %.1f s",
                    model.label, ref.id, start.name, mode, record["status"], record["steps"], record["n_imaginary"],
                    "-" if record["rmsd"] is None else f"{record['rmsd']:.3f}", record["irc_connects"],
                    record["wall_s"],
                )  # fmt: skip
        _write_outputs(out, settings, models, records, title)
    keys = {m.key for m in models}
    return summarize([r for r in records if r["model"] in keys], models, settings)


# --- summary and tables -------------------------------------------------------------------------------------------

_CRITERIA = ("converged", "one_imaginary", "rmsd_ok", "irc_connects", "success")


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def summarize(records: Sequence[dict], models: Sequence[Model], settings: Settings) -> dict:
    """Per model (by label) and per (start kind, mode): attempts, counts of each criterion, mean
    Sella steps of the converged searches, mean steps of all, mean wall time.

    Returns:
        {label: {"<kind>/<mode>": {"n", "converged", "one_imaginary", "rmsd_ok", "irc_connects",
        "success", "mean_steps_converged", "mean_steps", "mean_wall_s"}}}
    """
    out = {}
    for model in models:
        mine = [r for r in records if r["model"] == model.key]
        cells = {}
        for kind in START_KINDS:
            for mode in settings.modes:
                group = [r for r in mine if r["start_kind"] == kind and r["mode"] == mode]
                cell = {"n": len(group), **{c: sum(bool(r[c]) for r in group) for c in _CRITERIA}}
                cell["mean_steps_converged"] = _mean([r["steps"] for r in group if r["converged"]])
                cell["mean_steps"] = _mean([r["steps"] for r in group])
                cell["mean_wall_s"] = _mean([r["wall_s"] for r in group])
                cells[f"{kind}/{mode}"] = cell
        out[model.label] = cells
    return out


_MODE_NAMES = {"model": "model H", "sella": "Sella H"}


def _rate(k: int, n: int) -> str:
    return "-" if n == 0 else f"{100 * k / n:.0f}% ({k}/{n})"


def _num(x: float | None, fmt: str = ".0f") -> str:
    return "-" if x is None or not math.isfinite(x) else format(x, fmt)


def render_tables(summary: dict, settings: Settings, title: str = "TS search") -> str:
    """Markdown: one table with a row per model (scheme) and a column per (start kind, Hessian mode)
    giving the success rate and mean steps of the converged searches; then one table per model
    that has attempts with each criterion's rate."""
    columns = [(kind, mode) for kind in START_KINDS for mode in settings.modes]
    lines = [
        f"## {title}",
        "",
        f"Success = converged (fmax {settings.fmax:g} eV/A in {settings.max_steps} Sella steps), one imaginary "
        f"frequency of the model Hessian (below -{settings.imag_tol_cm:g} cm^-1), aligned RMSD to the DFT TS "
        f"< {settings.rmsd_tol:g} A, IRC ends relaxing to the reactant and product. Starts: `guess` = the "
        f"pipeline's TS guess ({settings.guess}); `perturbed` = the DFT TS displaced by RMS "
        f"{settings.rms_range[0]:g}-{settings.rms_range[1]:g} A ({settings.perturbations} per reaction, seed "
        f"{settings.seed}). Model H: the model's Hessian at every step; Sella H: Sella's own. Cells: success "
        f"rate (successes/attempts), mean steps of the converged searches.",
        "",
        "| scheme | " + " | ".join(f"{kind}, {_MODE_NAMES[mode]}" for kind, mode in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for label, cells in summary.items():
        entries = []
        for kind, mode in columns:
            c = cells[f"{kind}/{mode}"]
            entries.append(f"{_rate(c['success'], c['n'])}, {_num(c['mean_steps_converged'])} steps")
        lines.append(f"| {label} | " + " | ".join(entries) + " |")
    for label, cells in summary.items():
        if not any(c["n"] for c in cells.values()):
            continue  # not run yet: its row above says so
        lines += [
            "",
            f"### {label}",
            "",
            "| start | Hessian | n | converged | 1 imaginary | RMSD ok | IRC connects | success | steps (conv.) "
            "| steps (all) | wall (s) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for kind, mode in columns:
            c = cells[f"{kind}/{mode}"]
            rates = " | ".join(_rate(c[k], c["n"]) for k in _CRITERIA)
            lines.append(
                f"| {kind} | {_MODE_NAMES[mode]} | {c['n']} | {rates} | {_num(c['mean_steps_converged'], '.1f')} "
                f"| {_num(c['mean_steps'], '.1f')} | {_num(c['mean_wall_s'], '.1f')} |"
            )
    return "\n".join(lines) + "\n"
