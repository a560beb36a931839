"""GFN2-xTB labels through tblite: energies, analytic gradients, FD Hessians, FD HVPs (the `scale` extra).

The size-scaling data set (:mod:`phljax.datagen.scale`) is labelled at GFN2-xTB, not at the DFT
level of the reaction set: the question it serves is about the training method, so any
consistent reference surface does, and xTB is 100-1000x cheaper. tblite gives the energy and its
analytic gradient; second derivatives are central differences of analytic gradients:

    H[:, j] = (g(R + h e_j) - g(R - h e_j)) / (2 h)            (Hessian: 6N gradients)
    H v     = |v| (g(R + h u) - g(R - h u)) / (2 h),  u = v/|v|  (one HVP: 2 gradients)

Every displaced calculation restarts from the converged wavefunction at R. A Hessian is checked
before it is returned (:func:`fd_hessian`): symmetry (its columns are independent differences,
so asymmetry measures the FD error), the translational sum rule, and agreement with a second
step 2h on a few columns (truncation error grows as h^2, SCF noise as 1/h: agreement means h is
in between).

Units as in :mod:`phljax.datagen.dft`: positions in Angstrom in; energies Hartree, gradients
Hartree/Bohr [N, 3], Hessians Hartree/Bohr^2 [N, 3, N, 3], HVPs Hartree/Bohr^2 per unit probe
[K, N, 3]. tblite works in Bohr; positions are converted with the DFT-side ``DFT_BOHR``, and the
ASE calculator returns eV and eV/Angstrom with ``DFT_HARTREE`` (see :mod:`phljax.units`).

References:
    C. Bannwarth, S. Ehlert, S. Grimme, "GFN2-xTB - an accurate and broadly parametrized
    self-consistent tight-binding quantum chemical method with multipole electrostatics and
    density-dependent dispersion contributions", J. Chem. Theory Comput. 15, 1652 (2019).
    tblite (https://github.com/tblite/tblite), ``tblite.interface.Calculator``.
"""

from __future__ import annotations

import dataclasses
import time
from importlib import metadata
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes
from ase.optimize import LBFGS

from phljax.datagen.dft import HessianCheckError, SCFNotConvergedError, validate_hessian
from phljax.units import DFT_BOHR, DFT_HARTREE, DFT_KB

__all__ = [
    "XTB_FD_STEP",
    "XTB_HESSIAN_LIMITS",
    "XTBLevel",
    "XTBHessianLimits",
    "XTBCalculator",
    "singlepoint",
    "fd_hessian",
    "fd_hvp",
    "relax",
]

#: Default finite-difference displacement of xTB Hessians and HVPs, Angstrom. At the default
#: accuracy (0.01) max|H(h) - H(2h)|/max|H| is 2e-5 to 4e-5 at h = 2e-3 A (water, methane, distorted
#: ethanol), 2e-4 at 5e-3 A and 9e-4 at 1e-2 A (truncation, ~h^2); at 1e-3 A the asymmetry grows
#: again (6e-5 for ethanol: SCC convergence noise). At tblite's default accuracy 1.0 the errors are
#: 10-30x larger at every step from 1e-3 to 1e-2 A.
XTB_FD_STEP = 2e-3


@dataclasses.dataclass(frozen=True)
class XTBLevel:
    """Everything that fixes the xTB labels.

    Attributes:
        method: tblite's parametrisation: ``GFN2-xTB`` (default), ``GFN1-xTB`` or ``IPEA1-xTB``.
        accuracy: tblite's numerical accuracy (its SCC convergence thresholds scale with it;
            tblite's default is 1.0). 0.01 keeps SCC noise in the gradient well below the FD
            truncation error at the default step.
        electronic_temperature: Fermi smearing temperature, Kelvin (tblite's default 300 K).
        max_iterations: maximum SCC iterations.
        charge: total charge, elementary charges.
        uhf: number of unpaired electrons.
    """

    method: str = "GFN2-xTB"
    accuracy: float = 0.01
    electronic_temperature: float = 300.0
    max_iterations: int = 250
    charge: int = 0
    uhf: int = 0

    def describe(self) -> dict[str, Any]:
        """The settings plus the program and its version, as a JSON-ready dict."""
        return {**dataclasses.asdict(self), "program": "tblite", "tblite_version": metadata.version("tblite")}


@dataclasses.dataclass(frozen=True)
class XTBHessianLimits:
    """Acceptance limits of :func:`fd_hessian`, relative to max |H|.

    xTB's energy is exactly translation invariant and its analytic gradient is the energy's
    derivative, so all three errors are finite-difference errors (truncation and SCC noise);
    at the default step and accuracy they are ~1e-6 to 1e-4 (water to 150-atom molecules).

    Attributes:
        max_asym_rel: largest accepted max |H - H^T| / max |H|.
        max_sum_rule_rel: largest accepted max |sum_j H[i, :, j, :]| / max |H|.
        max_step_rel: largest accepted max |H_h - H_2h| / max |H| over the checked columns.
    """

    max_asym_rel: float = 1e-3
    max_sum_rule_rel: float = 1e-3
    max_step_rel: float = 1e-3


XTB_HESSIAN_LIMITS = XTBHessianLimits()


def _check_geometry(numbers, positions) -> tuple[np.ndarray, np.ndarray]:
    numbers = np.asarray(numbers, dtype=int)
    positions = np.asarray(positions, dtype=np.float64)
    n = numbers.shape[0]
    if numbers.ndim != 1 or n == 0 or positions.shape != (n, 3):
        raise ValueError(
            f"expected numbers [N] and positions [N, 3] Angstrom, got {numbers.shape} and {positions.shape}"
        )
    if not np.all(np.isfinite(positions)):
        raise ValueError(f"positions have a non-finite value at index {tuple(np.argwhere(~np.isfinite(positions))[0])}")
    return numbers, positions


class _Evaluator:
    """A tblite calculator for one molecule: energy and analytic gradient at any geometry.

    The first call (at the reference geometry) starts from tblite's guess; every later call
    restarts from that converged wavefunction, so the result of a displaced geometry does not
    depend on the order of the calls, or with ``follow`` from the previous call's (along an
    optimisation). ``n_gradients`` counts the calls.
    """

    def __init__(self, numbers: np.ndarray, positions: np.ndarray, level: XTBLevel, follow: bool = False):
        from tblite.exceptions import TBLiteRuntimeError  # noqa: PLC0415 (optional: the scale extra)
        from tblite.interface import Calculator as TBLite  # noqa: PLC0415 (optional: the scale extra)

        self.numbers, self.level = numbers, level
        try:
            self._calc = TBLite(level.method, numbers, positions / DFT_BOHR, charge=level.charge, uhf=level.uhf)
        except TBLiteRuntimeError as err:  # e.g. atoms too close
            raise SCFNotConvergedError(
                f"{level.method}: tblite refuses the {len(numbers)}-atom geometry: {err}"
            ) from err
        self._calc.set("verbosity", 0)
        self._calc.set("accuracy", level.accuracy)
        self._calc.set("max-iter", level.max_iterations)
        self._calc.set("temperature", level.electronic_temperature * DFT_KB)  # Hartree
        self._reference = None
        self._follow = follow
        self.n_gradients = 0

    def __call__(self, positions: np.ndarray) -> tuple[float, np.ndarray]:  # Hartree, [N, 3] Hartree/Bohr
        from tblite.exceptions import TBLiteRuntimeError  # noqa: PLC0415 (optional: the scale extra)

        try:  # any failure of tblite (SCC not converged, atoms too close) is a failed calculation
            self._calc.update(np.ascontiguousarray(positions / DFT_BOHR))
            res = self._calc.singlepoint(self._reference, copy=True)
        except TBLiteRuntimeError as err:
            raise SCFNotConvergedError(
                f"{self.level.method} SCC of {len(self.numbers)} atoms: {err} (accuracy {self.level.accuracy}, "
                f"max_iterations {self.level.max_iterations})"
            ) from err
        if self._reference is None or self._follow:
            self._reference = res
        self.n_gradients += 1
        energy, gradient = float(res.get("energy")), np.asarray(res.get("gradient"), dtype=np.float64)
        if not (np.isfinite(energy) and np.all(np.isfinite(gradient))):
            raise SCFNotConvergedError(f"{self.level.method}: non-finite energy or gradient ({energy})")
        return energy, gradient


def singlepoint(numbers: np.ndarray, positions: np.ndarray, level: XTBLevel = XTBLevel()) -> dict[str, Any]:
    """Energy and analytic gradient of one geometry.

    Args:
        numbers: atomic numbers, [N] int.
        positions: Cartesian positions, [N, 3] Angstrom.
        level: xTB settings.

    Returns:
        ``{"energy": Hartree, "gradient": [N, 3] Hartree/Bohr (dE/dR), "wall": seconds}``.

    Raises:
        SCFNotConvergedError: if the SCC does not converge.
        ValueError: on bad shapes or non-finite positions.
    """
    numbers, positions = _check_geometry(numbers, positions)
    t0 = time.perf_counter()
    energy, gradient = _Evaluator(numbers, positions, level)(positions)
    return {"energy": energy, "gradient": gradient, "wall": time.perf_counter() - t0}


def _central_differences(evaluate: _Evaluator, positions: np.ndarray, directions: np.ndarray, step: float):
    """(g(R + h u) - g(R - h u)) / (2 h) for unit directions u [M, N, 3]: [M, N, 3] Hartree/Bohr^2."""
    h_bohr = step / DFT_BOHR
    out = np.empty_like(directions)
    for m, u in enumerate(directions):
        out[m] = (evaluate(positions + step * u)[1] - evaluate(positions - step * u)[1]) / (2 * h_bohr)
    return out


def fd_hessian(
    numbers: np.ndarray,  # [N]
    positions: np.ndarray,  # [N, 3] Angstrom
    level: XTBLevel = XTBLevel(),
    step: float = XTB_FD_STEP,  # Angstrom
    check_columns: int | None = 6,
    limits: XTBHessianLimits = XTB_HESSIAN_LIMITS,
) -> dict[str, Any]:
    """Checked Hessian by central differences of analytic xTB gradients (1 + 6N + 2C gradients).

    Each column j is (g(R + h e_j) - g(R - h e_j)) / (2h). The raw matrix must be symmetric and
    satisfy the translational sum rule to ``limits``, and ``check_columns`` columns (evenly
    spaced over the 3N coordinates; None: all) recomputed with step 2h must agree with it
    (truncation error grows as h^2, SCC noise as 1/h: disagreement means h is off).

    Args:
        numbers: atomic numbers, [N] int.
        positions: Cartesian positions, [N, 3] Angstrom.
        level: xTB settings.
        step: displacement h of every coordinate, Angstrom.
        check_columns: number of columns checked against step 2h (0: none, None: all 3N).
        limits: acceptance limits.

    Returns:
        ``energy`` (Hartree), ``gradient`` [N, 3] Hartree/Bohr, ``hessian`` [N, 3, N, 3]
        Hartree/Bohr^2 (symmetrised: (H + H^T)/2), ``asym_rel``, ``sum_rule_rel``, ``step_rel``
        (max |H_h - H_2h| / max |H| over the checked columns; 0 if none), ``fd_step`` (Angstrom),
        ``n_gradients``, ``wall`` (seconds).

    Raises:
        HessianCheckError: naming the check, its value and the limit, if a check fails.
        SCFNotConvergedError: if an SCC does not converge.
        ValueError: on bad shapes, non-finite positions or step <= 0.
    """
    numbers, positions = _check_geometry(numbers, positions)
    if not step > 0:
        raise ValueError(f"step must be > 0 Angstrom, got {step}")
    n = numbers.shape[0]
    d = 3 * n
    t0 = time.perf_counter()
    evaluate = _Evaluator(numbers, positions, level)
    energy, gradient = evaluate(positions)
    eye = np.eye(d).reshape(d, n, 3)
    columns = _central_differences(evaluate, positions, eye, step).reshape(d, d)  # [j, i] = dg_i/dx_j
    raw = columns.T  # [i, j]
    checks = validate_hessian(raw, limits.max_asym_rel, limits.max_sum_rule_rel)
    n_check = d if check_columns is None else min(check_columns, d)
    cols = np.unique(np.linspace(0, d - 1, n_check).astype(int))  # evenly spaced; all of them for n_check = d
    step_rel = 0.0
    if len(cols):
        double = _central_differences(evaluate, positions, eye[cols], 2 * step).reshape(len(cols), d)
        step_rel = float(np.abs(double - columns[cols]).max() / max(checks["max_abs"], 1e-300))
        if step_rel > limits.max_step_rel:
            raise HessianCheckError(
                f"FD Hessian of {n} atoms depends on the step: max|H(h) - H(2h)|/max|H| = {step_rel:.2e} > "
                f"{limits.max_step_rel:.1e} at h = {step} A over columns {cols.tolist()}; try another step "
                f"(smaller if truncation dominates, larger if SCC noise does) or a tighter accuracy"
            )
    return {
        "energy": energy,
        "gradient": gradient,
        "hessian": (0.5 * (raw + raw.T)).reshape(n, 3, n, 3),
        "asym_rel": checks["asym_rel"],
        "sum_rule_rel": checks["sum_rule_rel"],
        "step_rel": step_rel,
        "fd_step": float(step),
        "n_gradients": evaluate.n_gradients,
        "wall": time.perf_counter() - t0,
    }


def fd_hvp(
    numbers: np.ndarray,  # [N]
    positions: np.ndarray,  # [N, 3] Angstrom
    probes: np.ndarray,  # [K, N, 3] dimensionless
    level: XTBLevel = XTBLevel(),
    step: float = XTB_FD_STEP,  # Angstrom
) -> dict[str, Any]:
    """Reference Hessian-vector products by central differences of analytic xTB gradients (1 + 2K gradients).

    For each probe v the geometry is displaced by +-h u with u = v / |v| (so ``step`` is the
    length of the displacement whatever the probe's norm) and H v = |v| (g(R + h u) - g(R - h u)) / (2h),
    as :func:`phljax.datagen.dft.fd_hvp` does for DFT.

    Args:
        numbers: atomic numbers, [N] int.
        positions: the geometry, [N, 3] Angstrom.
        probes: probe vectors, [K, N, 3] (any norm > 0; see :func:`phljax.datagen.labels.make_probes`).
        level: xTB settings.
        step: displacement length h, Angstrom.

    Returns:
        ``energy`` (Hartree), ``gradient`` [N, 3] Hartree/Bohr (at R), ``hvps`` [K, N, 3]
        Hartree/Bohr^2, ``wall_scf``, ``wall_fd`` (seconds), ``n_gradients`` (1 + 2K).

    Raises:
        SCFNotConvergedError: if an SCC does not converge.
        ValueError: on bad shapes, a zero or non-finite probe, or step <= 0.
    """
    numbers, positions = _check_geometry(numbers, positions)
    n = numbers.shape[0]
    probes = np.asarray(probes, dtype=np.float64)
    if probes.ndim != 3 or probes.shape[1:] != (n, 3) or len(probes) == 0:
        raise ValueError(f"expected probes [K >= 1, {n}, 3], got {probes.shape}")
    norms = np.linalg.norm(probes.reshape(len(probes), -1), axis=1)
    if not (np.all(np.isfinite(norms)) and np.all(norms > 0)) or not step > 0:
        raise ValueError(f"probes must be finite and non-zero and step > 0 (norms {norms}, step {step})")
    t0 = time.perf_counter()
    evaluate = _Evaluator(numbers, positions, level)
    energy, gradient = evaluate(positions)
    t1 = time.perf_counter()
    hvps = _central_differences(evaluate, positions, probes / norms[:, None, None], step) * norms[:, None, None]
    return {
        "energy": energy,
        "gradient": gradient,
        "hvps": hvps,
        "wall_scf": t1 - t0,
        "wall_fd": time.perf_counter() - t1,
        "n_gradients": evaluate.n_gradients,
    }


class XTBCalculator(Calculator):
    """An ASE calculator: xTB energy (eV) and forces (eV/Angstrom), for ASE's optimisers.

    Each call after the first restarts from the previous geometry's wavefunction (so an
    optimisation's SCCs converge in a few cycles). An SCC that does not converge raises
    :class:`SCFNotConvergedError`. ``n_gradients`` counts the evaluations.
    """

    implemented_properties = ("energy", "forces")

    def __init__(self, level: XTBLevel = XTBLevel()):
        super().__init__()
        self.level = level
        self.n_gradients = 0
        self._evaluate: _Evaluator | None = None

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        numbers = np.asarray(self.atoms.numbers, dtype=int)
        if self._evaluate is None or not np.array_equal(self._evaluate.numbers, numbers):
            self._evaluate = _Evaluator(numbers, self.atoms.positions, self.level, follow=True)
        energy, gradient = self._evaluate(self.atoms.positions)
        self.n_gradients += 1
        self.results = {"energy": energy * DFT_HARTREE, "forces": -gradient * DFT_HARTREE / DFT_BOHR}


def relax(
    numbers: np.ndarray,  # [N]
    positions: np.ndarray,  # [N, 3] Angstrom
    level: XTBLevel = XTBLevel(),
    fmax: float = 0.01,  # eV/Angstrom
    max_steps: int = 3000,
) -> dict[str, Any]:
    """Minimise the xTB energy with ASE's LBFGS to max |force| <= ``fmax``.

    Args:
        numbers: atomic numbers, [N] int.
        positions: starting positions, [N, 3] Angstrom (e.g. an RDKit ETKDG conformer).
        level: xTB settings.
        fmax: convergence criterion, the largest force component's norm per atom, eV/Angstrom.
        max_steps: LBFGS steps allowed.

    Returns:
        ``{"positions": [N, 3] Angstrom, "energy": Hartree, "gradient": [N, 3] Hartree/Bohr (at the
        returned geometry), "fmax": the achieved max per-atom |force|, eV/Angstrom, "n_steps",
        "n_gradients", "wall": seconds}``.

    Raises:
        SCFNotConvergedError: if an SCC does not converge, or LBFGS does not reach ``fmax`` in
            ``max_steps`` steps (the message says how far it got).
    """
    numbers, positions = _check_geometry(numbers, positions)
    t0 = time.perf_counter()
    atoms = Atoms(numbers=numbers, positions=positions)
    atoms.calc = XTBCalculator(level)
    opt = LBFGS(atoms, logfile=None)
    converged = opt.run(fmax=fmax, steps=max_steps)
    forces = atoms.get_forces()
    achieved = float(np.linalg.norm(forces, axis=1).max())
    if not converged:
        raise SCFNotConvergedError(
            f"LBFGS did not converge in {max_steps} steps: max per-atom |F| = {achieved:.3g} eV/A > fmax {fmax} "
            f"({len(numbers)} atoms)"
        )
    return {
        "positions": atoms.positions.copy(),
        "energy": atoms.get_potential_energy() / DFT_HARTREE,
        "gradient": -forces * DFT_BOHR / DFT_HARTREE,
        "fmax": achieved,
        "n_steps": int(opt.nsteps),
        "n_gradients": atoms.calc.n_gradients,
        "wall": time.perf_counter() - t0,
    }
