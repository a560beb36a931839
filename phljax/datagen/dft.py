"""PySCF labelling at omegaB97X-D/6-31G(d): energies, gradients, analytic Hessians, optimisation.

The exchange-correlation part is libxc's ``hyb_gga_xc_wb97x_d`` (PySCF refuses the alias
``wb97x-d``); the damped C6 dispersion term of omegaB97X-D, which libxc does not include, is
added from :mod:`phljax.datagen.dispersion` to the energy, the gradient and the Hessian.

All functions here take positions in Angstrom (the unit PySCF's ``Mole`` is built with) and
return atomic units: energies in Hartree, gradients in Hartree/Bohr, Hessians in
Hartree/Bohr^2 in the [N, 3, N, 3] layout (PySCF's own Hessian is [N, N, 3, 3]).

References:
    J.-D. Chai, M. Head-Gordon, Phys. Chem. Chem. Phys. 10, 6615 (2008) (omegaB97X-D).
    Q. Sun et al., "Recent developments in the PySCF program package", J. Chem. Phys. 153,
    024109 (2020).
    L.-P. Wang, C. Song, "Geometry optimization made simple with translation and rotation
    coordinates", J. Chem. Phys. 144, 214108 (2016) (geomeTRIC).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from typing import Any

import numpy as np
from ase.calculators.calculator import Calculator, all_changes

from phljax.datagen.dispersion import chg_dispersion
from phljax.units import DFT_BOHR, DFT_HARTREE


class SCFNotConvergedError(RuntimeError):
    """Raised when an SCF (or a geometry optimisation) does not converge: never write its data."""


class HessianCheckError(ValueError):
    """Raised when a Hessian fails the symmetry or translational sum-rule check."""


@dataclasses.dataclass(frozen=True)
class LevelOfTheory:
    """Everything that fixes the electronic-structure labels.

    Attributes:
        xc: libxc functional name (the omegaB97X-D XC part without dispersion).
        basis: PySCF basis name; ``'6-31g*'`` is 6-31G(d).
        cart: Cartesian (6d) instead of spherical (5d) d shells; PySCF's default is spherical.
        grid_level: PySCF DFT integration grid level (0-9); level 5 keeps the Hessian
            translational sum rule at ~1e-3 relative, the default 3 breaks it at ~1e-2.
        conv_tol: SCF energy convergence threshold, Hartree.
        conv_tol_cpscf: coupled-perturbed SCF residual threshold of the Hessian (dimensionless).
        max_cycle: maximum SCF iterations.
        dispersion: add the Chai--Head-Gordon damped D2 term of omegaB97X-D.
    """

    xc: str = "hyb_gga_xc_wb97x_d"
    basis: str = "6-31g*"
    cart: bool = False
    grid_level: int = 5
    conv_tol: float = 1e-10
    conv_tol_cpscf: float = 1e-9
    max_cycle: int = 200
    dispersion: bool = True

    def describe(self) -> dict[str, Any]:
        """The settings plus the PySCF, libxc and geomeTRIC versions, as a JSON-ready dict."""
        import pyscf  # noqa: PLC0415 (optional: the `data` extra)
        from pyscf.dft import libxc  # noqa: PLC0415 (optional: the `data` extra)

        versions = {"pyscf_version": pyscf.__version__, "libxc_version": libxc.__version__}
        try:
            import geometric  # noqa: PLC0415 (optional: the `data` extra)

            versions["geometric_version"] = geometric.__version__
        except ImportError:
            pass
        return {**dataclasses.asdict(self), **versions}


def build_mol(
    numbers: np.ndarray,  # [N] atomic numbers
    positions: np.ndarray,  # [N, 3] Angstrom
    level: LevelOfTheory = LevelOfTheory(),
    charge: int = 0,
    spin: int = 0,
    verbose: int = 0,
):
    """A PySCF ``Mole`` for a geometry.

    Args:
        numbers: atomic numbers, [N] int.
        positions: Cartesian positions, [N, 3] Angstrom.
        level: basis and Cartesian/spherical choice.
        charge: total charge (elementary charges).
        spin: 2S (number of unpaired electrons); 0 for the closed-shell molecules used here.
        verbose: PySCF verbosity.

    Returns:
        A built ``pyscf.gto.Mole`` (symmetry off, so the frame is never reoriented).

    Raises:
        ValueError: on shape mismatch.
    """
    from pyscf import gto  # noqa: PLC0415 (optional: the `data` extra)

    numbers = np.asarray(numbers, dtype=int)
    positions = np.asarray(positions, dtype=np.float64)
    if numbers.ndim != 1 or positions.shape != (numbers.shape[0], 3):
        raise ValueError(f"expected numbers [N] and positions [N, 3], got {numbers.shape} and {positions.shape}")
    atom = [(int(z), tuple(float(x) for x in p)) for z, p in zip(numbers, positions, strict=True)]
    mol = gto.Mole()
    mol.atom = atom
    mol.unit = "Angstrom"
    mol.basis = level.basis
    mol.cart = level.cart
    mol.charge = charge
    mol.spin = spin
    mol.symmetry = False
    mol.verbose = verbose
    mol.build()
    return mol


def make_rks(mol, level: LevelOfTheory = LevelOfTheory()):
    """A restricted Kohn--Sham object configured with ``level`` (not yet run).

    Args:
        mol: a built ``pyscf.gto.Mole``.
        level: functional, grid and tolerances.

    Returns:
        ``pyscf.dft.RKS`` (``pyscf.scf.RHF`` for ``xc="hf"``) with ``xc``, ``grids.level``, ``conv_tol`` (Hartree),
        ``conv_tol_cpscf`` and ``max_cycle`` set.
    """
    from pyscf import dft, scf  # noqa: PLC0415 (optional: the `data` extra)

    if level.xc.lower() == "hf":  # Hartree-Fock (cheap guess level, tests): no integration grid
        mf = scf.RHF(mol)
    else:
        mf = dft.RKS(mol, xc=level.xc)
        mf.grids.level = level.grid_level
    mf.conv_tol = level.conv_tol
    mf.conv_tol_cpscf = level.conv_tol_cpscf
    mf.max_cycle = level.max_cycle
    return mf


def run_scf(mol, level: LevelOfTheory = LevelOfTheory(), dm0: np.ndarray | None = None):
    """Converge the RKS energy, raising instead of returning an unconverged result.

    Args:
        mol: a built ``pyscf.gto.Mole``.
        level: functional, grid and tolerances.
        dm0: optional initial density matrix [n_ao, n_ao] (e.g. from a nearby geometry).

    Returns:
        The converged ``pyscf.dft.RKS`` object (``mf.e_tot`` in Hartree, without dispersion).

    Raises:
        SCFNotConvergedError: if the SCF does not converge, even after a second-order retry.
    """
    mf = make_rks(mol, level)
    mf.kernel(dm0=dm0)
    if not mf.converged:
        # One retry with the second-order (Newton) solver from where the DIIS run stopped.
        mf2 = make_rks(mol, level).newton()
        mf2.kernel(dm0=mf.make_rdm1())
        if not mf2.converged:
            raise SCFNotConvergedError(f"SCF did not converge ({level.xc}/{level.basis}, conv_tol={level.conv_tol})")
        mf = mf2
    return mf


def label_geometry(
    numbers: np.ndarray,  # [N]
    positions: np.ndarray,  # [N, 3] Angstrom
    level: LevelOfTheory = LevelOfTheory(),
    hessian: bool = True,
) -> dict[str, Any]:
    """Energy, gradient and analytic Hessian of one geometry, DFT and dispersion parts apart.

    Args:
        numbers: atomic numbers, [N] int.
        positions: Cartesian positions, [N, 3] Angstrom.
        level: level of theory.
        hessian: also compute the analytic Hessian (the expensive part).

    Returns:
        A dict of numpy values in atomic units:
        ``energy`` (Hartree, DFT + dispersion), ``energy_dft``, ``energy_disp``;
        ``gradient`` dE/dR [N, 3] Hartree/Bohr (total), ``gradient_dft``, ``gradient_disp``;
        if ``hessian``: ``hessian`` [N, 3, N, 3] Hartree/Bohr^2 (total, as computed, not
        symmetrised), ``hessian_dft``, ``hessian_disp``;
        ``numbers`` [N], ``positions`` [N, 3] Angstrom, ``scf_cycles``, ``wall_scf``,
        ``wall_grad``, ``wall_hess`` (seconds).

    Raises:
        SCFNotConvergedError: if the SCF does not converge.
    """
    numbers = np.asarray(numbers, dtype=int)
    positions = np.asarray(positions, dtype=np.float64)
    mol = build_mol(numbers, positions, level)
    t0 = time.perf_counter()
    mf = run_scf(mol, level)
    t1 = time.perf_counter()
    grad_dft = np.asarray(mf.nuc_grad_method().kernel())  # [N, 3] Hartree/Bohr
    t2 = time.perf_counter()
    out: dict[str, Any] = {
        "numbers": numbers,
        "positions": positions,
        "energy_dft": float(mf.e_tot),
        "gradient_dft": grad_dft,
        "scf_cycles": int(getattr(mf, "cycles", -1)),
        "wall_scf": t1 - t0,
        "wall_grad": t2 - t1,
        "wall_hess": 0.0,
    }
    if level.dispersion:
        e_d, g_d, h_d = chg_dispersion(numbers, mol.atom_coords(unit="Bohr"))
    else:
        n = len(numbers)
        e_d, g_d, h_d = 0.0, np.zeros((n, 3)), np.zeros((n, 3, n, 3))
    out["energy_disp"] = e_d
    out["gradient_disp"] = g_d
    out["energy"] = out["energy_dft"] + e_d
    out["gradient"] = grad_dft + g_d
    if hessian:
        h = np.asarray(mf.Hessian().kernel())  # [N, N, 3, 3] Hartree/Bohr^2
        out["wall_hess"] = time.perf_counter() - t2
        h_dft = h.transpose(0, 2, 1, 3)  # -> [N, 3, N, 3]
        out["hessian_dft"] = np.ascontiguousarray(h_dft)
        out["hessian_disp"] = h_d
        out["hessian"] = out["hessian_dft"] + h_d
    return out


@dataclasses.dataclass(frozen=True)
class HessianLimits:
    """Acceptance limits of the Hessian checks of :func:`validate_hessian`, relative to max |H|.

    PySCF's DFT Hessian has no integration-grid response, so it is neither exactly symmetric nor
    exactly translation invariant; both errors come from the grid. At grid level 5 the sum-rule
    error is typically 1e-3 and the asymmetry 1e-5 to 4e-4 (a finer grid shrinks them, a tighter
    CPSCF tolerance does not); the stored Hessians are symmetrised.

    Attributes:
        max_asym_rel: largest accepted max |H - H^T| / max |H|.
        max_sum_rule_rel: largest accepted max |sum_j H[i, :, j, :]| / max |H|.
    """

    max_asym_rel: float = 1e-3
    max_sum_rule_rel: float = 1e-2


#: The default Hessian-check limits of every labelling function and of the reaction pipeline.
HESSIAN_LIMITS = HessianLimits()


def hessian_checks(hessian: np.ndarray) -> dict[str, float]:  # [N, 3, N, 3] any energy/length^2
    """Symmetry and translational sum-rule errors of a Cartesian Hessian, relative to max |H|.

    The translational sum rule sum_j H[i, a, j, b] = 0 holds for any geometry (the energy is
    invariant under a rigid translation); the rotational one needs a stationary point and is
    not checked. Errors are scaled by max |H| so they are unit free.

    Args:
        hessian: [N, 3, N, 3] (or [3N, 3N]) in any consistent unit.

    Returns:
        ``{"asym_abs", "asym_rel", "sum_rule_abs", "sum_rule_rel", "max_abs"}``: asym = max
        |H - H^T|, sum_rule = max_{i,a,b} |sum_j H[i, a, j, b]| (absolute in the Hessian's
        unit, relative divided by max |H|), and max |H| itself.

    Raises:
        ValueError: if the shape is not [N, 3, N, 3] or [3N, 3N].
    """
    h = np.asarray(hessian, dtype=np.float64)
    if h.ndim == 2 and h.shape[0] == h.shape[1] and h.shape[0] % 3 == 0:
        n = h.shape[0] // 3
        h = h.reshape(n, 3, n, 3)
    if h.ndim != 4 or h.shape[1] != 3 or h.shape[3] != 3 or h.shape[0] != h.shape[2]:
        raise ValueError(f"expected a Hessian [N, 3, N, 3] or [3N, 3N], got {h.shape}")
    n = h.shape[0]
    flat = h.reshape(3 * n, 3 * n)
    scale = float(np.abs(flat).max())
    asym = float(np.abs(flat - flat.T).max())
    sum_rule = float(np.abs(h.sum(axis=2)).max())
    denom = scale if scale > 0 else 1.0
    return {
        "asym_abs": asym,
        "asym_rel": asym / denom,
        "sum_rule_abs": sum_rule,
        "sum_rule_rel": sum_rule / denom,
        "max_abs": scale,
    }


def validate_hessian(
    hessian: np.ndarray,  # [N, 3, N, 3]
    max_asym_rel: float = HESSIAN_LIMITS.max_asym_rel,
    max_sum_rule_rel: float = HESSIAN_LIMITS.max_sum_rule_rel,
) -> dict[str, float]:
    """Check a Hessian and raise if it is not symmetric or breaks the translational sum rule.

    Args:
        hessian: [N, 3, N, 3] or [3N, 3N], any consistent unit.
        max_asym_rel: largest accepted max |H - H^T| / max |H|.
        max_sum_rule_rel: largest accepted max |sum_j H[i, :, j, :]| / max |H|.

    Returns:
        The :func:`hessian_checks` dict when the Hessian passes.

    Raises:
        HessianCheckError: if either error exceeds its threshold or the Hessian is not finite.
        ValueError: on a bad shape.
    """
    h = np.asarray(hessian, dtype=np.float64)
    if not np.all(np.isfinite(h)):
        raise HessianCheckError("Hessian has non-finite entries")
    checks = hessian_checks(h)
    if checks["asym_rel"] > max_asym_rel:
        raise HessianCheckError(
            f"Hessian not symmetric: max|H-H^T|/max|H| = {checks['asym_rel']:.3e} > {max_asym_rel:.1e}"
        )
    if checks["sum_rule_rel"] > max_sum_rule_rel:
        raise HessianCheckError(
            "Hessian breaks the translational sum rule: max|sum_j H_ij|/max|H| = "
            f"{checks['sum_rule_rel']:.3e} > {max_sum_rule_rel:.1e}"
        )
    return checks


#: geomeTRIC convergence criteria used for the bundled minima (Hartree, Hartree/Bohr, Angstrom):
#: forces 3x looser than geomeTRIC's GAU_TIGHT, because at grid level 5 with conv_tol 1e-10 the
#: DFT gradient itself is only reliable to ~1e-5 Hartree/Bohr and GAU_TIGHT can then stall.
OPT_CONVERGENCE = {
    "convergence_energy": 1e-6,
    "convergence_grms": 3e-5,
    "convergence_gmax": 6e-5,
    "convergence_drms": 3e-4,
    "convergence_dmax": 6e-4,
}


def optimize_geometry(
    numbers: np.ndarray,  # [N]
    positions: np.ndarray,  # [N, 3] Angstrom
    level: LevelOfTheory = LevelOfTheory(),
    maxsteps: int = 100,
    convergence: dict[str, float] | None = None,
    accept_gmax: float = 4.5e-4,
    workdir: str | None = None,
) -> dict[str, Any]:
    """Minimise the energy (DFT + dispersion) with geomeTRIC through PySCF's interface.

    The DFT part is a PySCF gradient scanner (each step starts from the previous density);
    the dispersion energy and gradient are added in a wrapper given to geomeTRIC via
    ``pyscf.geomopt.as_pyscf_method`` and ``pyscf.geomopt.geometric_solver``.

    Args:
        numbers: atomic numbers, [N] int.
        positions: starting positions, [N, 3] Angstrom.
        level: level of theory.
        maxsteps: maximum optimisation steps.
        convergence: geomeTRIC criteria (``convergence_energy`` Hartree, ``convergence_grms``
            and ``convergence_gmax`` Hartree/Bohr, ``convergence_drms`` and
            ``convergence_dmax`` Angstrom); :data:`OPT_CONVERGENCE` if None.
        accept_gmax: if geomeTRIC stops without meeting the criteria, the last geometry is
            still accepted (``converged`` False) when its max |gradient| is below this,
            Hartree/Bohr (4.5e-4 is geomeTRIC's default GAU criterion).
        workdir: where geomeTRIC writes its log and trajectory (a temporary directory if None).

    Returns:
        ``{"positions": [N, 3] Angstrom, "energy": Hartree (at the returned geometry),
        "gmax": max |dE/dR| there, Hartree/Bohr, "n_steps", "wall": seconds,
        "converged": whether geomeTRIC's criteria were met}``.

    Raises:
        SCFNotConvergedError: if an SCF does not converge, or the optimisation stops with
            max |gradient| above ``accept_gmax``.
    """
    from pyscf.geomopt import as_pyscf_method  # noqa: PLC0415 (optional: the `data` extra)
    from pyscf.geomopt.geometric_solver import kernel as geometric_kernel  # noqa: PLC0415 (optional: the `data` extra)

    numbers = np.asarray(numbers, dtype=int)
    mol = build_mol(numbers, positions, level)
    scanner = make_rks(mol, level).nuc_grad_method().as_scanner()
    last = {"n": 0, "energy": float("nan"), "gmax": float("inf"), "coords": None}

    def energy_and_gradient(m):
        e, g = scanner(m)
        if not scanner.converged:
            raise SCFNotConvergedError("SCF did not converge during geometry optimisation")
        if level.dispersion:
            e_d, g_d, _ = chg_dispersion(numbers, m.atom_coords(unit="Bohr"))
            e, g = e + e_d, g + g_d
        last.update(n=last["n"] + 1, energy=float(e), gmax=float(np.abs(g).max()), coords=m.atom_coords(unit="Bohr"))
        return e, g

    method = as_pyscf_method(mol, energy_and_gradient)
    t0 = time.perf_counter()
    params = dict(OPT_CONVERGENCE if convergence is None else convergence)
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(workdir or tmp, "geometric")
        converged, mol_eq = geometric_kernel(method, maxsteps=maxsteps, prefix=prefix, **params)
    pos_bohr = mol_eq.atom_coords(unit="Bohr")
    if last["coords"] is None or not np.allclose(pos_bohr, last["coords"], atol=1e-8):
        energy_and_gradient(mol_eq)  # make energy/gmax refer to the returned geometry
    if not converged and last["gmax"] > accept_gmax:
        raise SCFNotConvergedError(
            f"geometry optimisation stopped after {maxsteps} steps with max|g| = {last['gmax']:.1e} Eh/Bohr"
        )
    return {
        "positions": pos_bohr * DFT_BOHR,
        "energy": last["energy"],
        "gmax": last["gmax"],
        "n_steps": last["n"],
        "wall": time.perf_counter() - t0,
        "converged": bool(converged),
    }


# ----------------------------------------------------------------------------- ASE interface


class PySCFCalculator(Calculator):
    """An ASE calculator: energy and forces (and an analytic Hessian for Sella) from PySCF.

    Each instance remembers its last density matrix and starts the next SCF from it, which
    roughly halves the SCF cycles along an optimisation, NEB or IRC. Energies are returned in
    eV, forces in eV/Angstrom, Hessians in eV/Angstrom^2, as ASE expects (converted with the
    DFT-side constants of :mod:`phljax.units`); all include the dispersion term when
    ``level.dispersion``. An SCF that does not converge raises :class:`SCFNotConvergedError`
    (ASE optimisers propagate it), it is never returned.

    Attributes:
        n_gradients: number of energy+gradient evaluations so far.
        n_hessians: number of analytic Hessians so far.
    """

    implemented_properties = ("energy", "forces")

    def __init__(self, level: LevelOfTheory = LevelOfTheory(), charge: int = 0, spin: int = 0):
        super().__init__()
        self.level = level
        self.charge = charge
        self.spin = spin
        self.n_gradients = 0
        self.n_hessians = 0
        self._dm = None

    def _scf(self, atoms):
        mol = build_mol(atoms.numbers, atoms.positions, self.level, self.charge, self.spin)
        dm0 = self._dm if self._dm is not None and self._dm.shape[-1] == mol.nao else None
        mf = run_scf(mol, self.level, dm0=dm0)
        self._dm = mf.make_rdm1()
        return mol, mf

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        mol, mf = self._scf(self.atoms)
        e = float(mf.e_tot)
        g = np.asarray(mf.nuc_grad_method().kernel())  # [N, 3] Hartree/Bohr
        if self.level.dispersion:
            e_d, g_d, _ = chg_dispersion(self.atoms.numbers, mol.atom_coords(unit="Bohr"))
            e, g = e + e_d, g + g_d
        self.n_gradients += 1
        self.results = {"energy": e * DFT_HARTREE, "forces": -g * DFT_HARTREE / DFT_BOHR}

    def hessian(self, atoms) -> np.ndarray:  # [3N, 3N] eV/Angstrom^2
        """Analytic Hessian (DFT + dispersion) at ``atoms``, [3N, 3N] eV/Angstrom^2 (Sella's layout)."""
        out = label_geometry(atoms.numbers, atoms.positions, self.level, hessian=True)
        self.n_hessians += 1
        n = len(atoms)
        return out["hessian"].reshape(3 * n, 3 * n) * DFT_HARTREE / DFT_BOHR**2


# ----------------------------------------------------------------------------- Hessian-free labels

#: Default finite-difference displacement of HVP labels (:func:`fd_hvp`), Angstrom.
FD_STEP = 5e-3


def fd_hvp(
    numbers: np.ndarray,  # [N]
    positions: np.ndarray,  # [N, 3] Angstrom
    probes: np.ndarray,  # [K, N, 3] dimensionless
    level: LevelOfTheory = LevelOfTheory(),
    step: float = FD_STEP,  # Angstrom
    charge: int = 0,
    spin: int = 0,
) -> dict[str, Any]:
    """Reference Hessian-vector products by central differences of analytic DFT gradients.

    For each probe v the geometry is displaced by +-h u with u = v / |v| (so ``step`` h is the
    length of the displacement whatever the probe's norm) and

        H v = |v| (g(R + h u) - g(R - h u)) / (2 h) + O(h^2),

    2K gradient evaluations instead of one analytic Hessian. Every displaced SCF starts from the
    converged density at R. The dispersion term is differentiated analytically (exact H_disp v).

    Args:
        numbers: atomic numbers, [N] int.
        positions: the geometry, [N, 3] Angstrom.
        probes: probe vectors, [K, N, 3] (Gaussian or one-hot, any norm > 0).
        level: level of theory.
        step: displacement length h, Angstrom.
        charge, spin: total charge and 2S.

    Returns:
        ``energy`` (Hartree), ``gradient`` [N, 3] Hartree/Bohr (total, at R), ``hvps``
        [K, N, 3] Hartree/Bohr^2 (total), ``hvps_disp`` (the analytic dispersion part),
        ``wall_scf``, ``wall_fd`` (seconds), ``n_gradients`` (1 + 2K).

    Raises:
        SCFNotConvergedError: if any SCF does not converge.
        ValueError: on bad shapes, a zero probe or a non-positive step.
    """
    numbers = np.asarray(numbers, dtype=int)
    positions = np.asarray(positions, dtype=np.float64)
    probes = np.asarray(probes, dtype=np.float64)
    n = numbers.shape[0]
    if probes.ndim != 3 or probes.shape[1:] != (n, 3):
        raise ValueError(f"expected probes [K, {n}, 3], got {probes.shape}")
    norms = np.linalg.norm(probes.reshape(len(probes), -1), axis=1)
    if np.any(norms == 0) or step <= 0:
        raise ValueError(f"probes must be non-zero and step > 0 (norms {norms}, step {step})")
    t0 = time.perf_counter()
    mol = build_mol(numbers, positions, level, charge, spin)
    mf = run_scf(mol, level)
    dm0 = mf.make_rdm1()
    grad = np.asarray(mf.nuc_grad_method().kernel())
    energy = float(mf.e_tot)
    t1 = time.perf_counter()

    def dft_gradient(pos):
        m = build_mol(numbers, pos, level, charge, spin)
        f = run_scf(m, level, dm0=dm0)
        return np.asarray(f.nuc_grad_method().kernel())

    hvps = np.empty_like(probes)
    for k, (v, nv) in enumerate(zip(probes, norms, strict=True)):
        u = v / nv
        g_plus = dft_gradient(positions + step * u)
        g_minus = dft_gradient(positions - step * u)
        hvps[k] = nv * (g_plus - g_minus) / (2 * step / DFT_BOHR)
    hvps_disp = np.zeros_like(probes)
    if level.dispersion:
        e_d, g_d, h_d = chg_dispersion(numbers, mol.atom_coords(unit="Bohr"))
        energy += e_d
        grad = grad + g_d
        hvps_disp = np.einsum("iajb,kjb->kia", h_d, probes)
    return {
        "energy": energy,
        "gradient": grad,
        "hvps": hvps + hvps_disp,
        "hvps_disp": hvps_disp,
        "wall_scf": t1 - t0,
        "wall_fd": time.perf_counter() - t1,
        "n_gradients": 1 + 2 * len(probes),
    }


def fd_hvp_error(
    hessian: np.ndarray,  # [N, 3, N, 3] Hartree/Bohr^2
    probes: np.ndarray,  # [K, N, 3]
    hvps: np.ndarray,  # [K, N, 3] Hartree/Bohr^2, e.g. fd_hvp()["hvps"]
) -> float:
    """max|H v - hvps| / max|H v| over all probes, atoms and components (dimensionless)."""
    exact = np.einsum("iajb,kjb->kia", hessian, probes)
    return float(np.abs(hvps - exact).max() / np.abs(exact).max())
