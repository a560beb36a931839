"""The search mechanics of the TS search benchmark: one Sella attempt on a model.

`run_attempt` runs Sella (`order=1`, internal coordinates) from one start in one Hessian mode
(`MODES`), analyses the saddle, follows its IRC both ways (`follow_irc`) and relaxes the ends
(`relax`); `Settings` holds everything that decides the result, `Reference` a reaction's DFT
geometries and `Start` a start. What is measured, and why `diag_every_n=EVERY_STEP`: see the
package docstring (`phljax.ts_search`).

Units: positions Angstrom, energies eV, forces eV/A, Hessians eV/A^2, frequencies cm^-1.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

import jax
import numpy as np
from ase import Atoms
from ase.optimize import BFGS

from phljax.calculator import PHLCalculator
from phljax.datagen.reactions.checks import ENDPOINT_RMSD, IMAG_TOL_CM, aligned_rmsd, match_endpoint
from phljax.optional import import_sella
from phljax.vibrations import harmonic_analysis

__all__ = [
    "Settings",
    "Reference",
    "Start",
    "Model",
    "MODES",
    "START_KINDS",
    "EVERY_STEP",
    "follow_irc",
    "relax",
    "run_attempt",
]

MODES = ("model", "sella")  # Hessian modes: the model's at every step | Sella's own updates
START_KINDS = ("guess", "perturbed")  # where an attempt starts: the TS guess | a perturbed TS
EVERY_STEP = -1  # Sella's diag_every_n for a fresh Hessian at every step (see the package docstring)


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


# --- one attempt --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Model:
    """A trained run: `key` identifies it in the attempt log, `label` is its table row (the scheme)."""

    key: str
    label: str
    workdir: str


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
    package docstring; also `steps`, `n_hessians` (model Hessians in the search: steps + 1 in
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
