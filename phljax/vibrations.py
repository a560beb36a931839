"""Harmonic analysis of a Cartesian Hessian: normal modes, frequencies, and bridges to ASE.

For N atoms with masses m (amu) and a Cartesian Hessian H [3N, 3N] (eV/A^2), the normal modes
are the eigenvectors of the mass-weighted Hessian H_mw = M^-1/2 H M^-1/2 (M = diag of m, each
mass repeated three times). The Hessian of a free molecule is invariant under translations
and rotations, so H_mw has 6 zero eigenvalues (5 for a linear molecule, 3 for an atom) with the
rigid-body vectors, in mass-weighted coordinates,

    T_a = sqrt(m_i) e_a,    R_k = sqrt(m_i) p_k x (r_i - r_com)    (a, k = 1..3),

where p_k are the principal axes of inertia. A rotation whose principal moment I_k is (near)
zero has a (near) zero vector and is dropped: that is what makes a molecule linear. With Q
[3N, n_rigid] the orthonormalised T and R and B [3N, 3N - n_rigid] an orthonormal basis of
their complement, the vibrations are the eigenpairs (lambda, c) of B^T H_mw B (the Eckart
projection, as in Gaussian and PySCF): the eigenvector in mass-weighted coordinates is
e = B c, the Cartesian displacement M^-1/2 e, and the wavenumber
nu = sqrt(lambda) / (2 pi c_light), negative (imaginary) when lambda < 0.

Everything here is host-side numpy, for one molecule at a time.

References:
    E. B. Wilson, J. C. Decius, P. C. Cross, "Molecular Vibrations" (1955), ch. 2 and 11;
    J. W. Ochterski, "Vibrational Analysis in Gaussian" (Gaussian white paper, 1999);
    the `pyscf.hessian.thermo.harmonic_analysis` and `ase.vibrations.VibrationsData` sources.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from ase import Atoms
from ase.data import atomic_masses
from ase.thermochemistry import IdealGasThermo
from ase.vibrations import VibrationsData

from phljax import units

__all__ = [
    "Harmonic",
    "mass_weighted_hessian",
    "rigid_body_projector",
    "harmonic_analysis",
    "hessian_eigenvalues",
    "count_negative",
    "to_vibrations_data",
    "ideal_gas_thermo",
]

CM1 = units.WAVENUMBER  # cm^-1 per sqrt(eV/A^2/amu)
INVCM = units.INVCM  # eV per cm^-1

LINEAR_TOL = 1e-6  # amu A^2: a principal moment of inertia at or below this is zero (a linear molecule or an atom)
IMAGINARY_CM1 = 10.0  # cm^-1: default threshold of `Harmonic.n_imaginary`
NEGATIVE_TOL = 1e-3  # eV/A^2 (or eV/A^2/amu): default tolerance of `count_negative`
_SYMMETRY_RTOL = 1e-2  # |H - H^T| above this times max |H| is a layout error (e.g. PySCF's [N, N, 3, 3]), not noise


class Harmonic(NamedTuple):
    """Result of `harmonic_analysis`, M modes sorted by ascending eigenvalue.

    Attributes:
        frequencies: [M] wavenumbers, cm^-1; imaginary frequencies (negative eigenvalues) are negative.
        modes: [M, N, 3] Cartesian normal-mode displacements M^-1/2 e, where e are the orthonormal
            eigenvectors of the (projected) mass-weighted Hessian: the convention of ASE's
            `VibrationsData.get_modes` and PySCF's `norm_mode`. Not unit vectors: |mode|^2 = 1 / reduced
            mass, so `modes[k] * sqrt(reduced_masses[k])` is the unit-norm Cartesian mode.
        eigenvalues: [M] eigenvalues of the projected mass-weighted Hessian, eV/A^2/amu.
        reduced_masses: [M] 1 / |mode|^2, amu (the Gaussian and PySCF definition; for a diatomic it is
            m1 m2 (m1 + m2) / (m1^2 + m2^2), not the classical m1 m2 / (m1 + m2)).
        n_rigid: number of rigid-body motions projected out (6, 5 for a linear molecule, 3 for an atom;
            0 without projection).
    """

    frequencies: np.ndarray  # [M] cm^-1, imaginary ones negative
    modes: np.ndarray  # [M, N, 3] Cartesian displacements M^-1/2 e (1/sqrt(amu))
    eigenvalues: np.ndarray  # [M] eV/A^2/amu
    reduced_masses: np.ndarray  # [M] amu
    n_rigid: int

    def n_imaginary(self, threshold_cm1: float = IMAGINARY_CM1) -> int:
        """Number of frequencies below -`threshold_cm1` (cm^-1): 0 at a minimum, 1 at a transition state.

        The default 10 cm^-1 ignores the small imaginary frequencies that numerical noise (DFT grids,
        finite differences, float32 models) gives to soft modes and near-zero rigid-body remainders.
        """
        return int(np.count_nonzero(self.frequencies < -threshold_cm1))


# --- input checks -------------------------------------------------------------------------------------------------


def _finite(name: str, value: np.ndarray) -> np.ndarray:
    if not np.all(np.isfinite(value)):
        bad = np.count_nonzero(~np.isfinite(value))
        raise ValueError(f"{name} of shape {value.shape} has {bad} non-finite (NaN or inf) entries")
    return value


def _hessian_2d(hessian, n_atoms: int | None = None) -> np.ndarray:
    """The Hessian as a symmetric [3N, 3N] float64 array from [3N, 3N] or [N, 3, N, 3]."""
    h = _finite("hessian", np.asarray(hessian, dtype=np.float64))
    if h.ndim == 4 and h.shape[1] == 3 and h.shape[3] == 3 and h.shape[0] == h.shape[2]:
        h = h.reshape(3 * h.shape[0], 3 * h.shape[0])
    elif not (h.ndim == 2 and h.shape[0] == h.shape[1] and h.shape[0] % 3 == 0 and h.shape[0] > 0):
        raise ValueError(
            f"hessian must have shape [3N, 3N] or [N, 3, N, 3], got {h.shape} "
            "(PySCF's [N, N, 3, 3] becomes [N, 3, N, 3] with .transpose(0, 2, 1, 3))"
        )
    if n_atoms is not None and h.shape[0] != 3 * n_atoms:
        raise ValueError(f"hessian of shape {np.shape(hessian)} does not match {n_atoms} atoms (3N = {3 * n_atoms})")
    asym = np.abs(h - h.T).max()
    if asym > _SYMMETRY_RTOL * np.abs(h).max():
        raise ValueError(
            f"hessian of shape {np.shape(hessian)} is not symmetric (max |H - H^T| = {asym:.3g}, max |H| = "
            f"{np.abs(h).max():.3g}); expected [3N, 3N] or [N, 3, N, 3] eV/A^2 (PySCF's layout is [N, N, 3, 3])"
        )
    return 0.5 * (h + h.T)


def _positions(positions, n_atoms: int | None = None) -> np.ndarray:
    r = np.asarray(positions, dtype=np.float64)
    if r.ndim != 2 or r.shape[1] != 3 or r.shape[0] == 0:
        raise ValueError(f"positions must have shape [N, 3] (Angstrom), got {r.shape}")
    if n_atoms is not None and r.shape[0] != n_atoms:
        raise ValueError(f"positions of shape {r.shape} do not match {n_atoms} atoms")
    return _finite("positions", r)


def _masses(masses, n_atoms: int) -> np.ndarray:
    m = np.asarray(masses, dtype=np.float64)
    if m.shape != (n_atoms,):
        raise ValueError(f"masses must have shape [N] = ({n_atoms},) (amu), got {m.shape}")
    _finite("masses", m)
    if np.any(m <= 0):
        raise ValueError(f"masses must be positive (amu), got {m.tolist()}")
    return m


def _default_masses(numbers) -> np.ndarray:
    z = np.asarray(numbers)
    if z.ndim != 1 or z.shape[0] == 0 or not np.issubdtype(z.dtype, np.integer):
        raise ValueError(f"numbers must be an int array [N], got {z.dtype} {z.shape}")
    if np.any((z < 1) | (z >= len(atomic_masses))):
        raise ValueError(f"unknown atomic number(s) in {z.tolist()}")
    return atomic_masses[z].astype(np.float64)  # [N] amu, standard atomic weights


# --- projection ---------------------------------------------------------------------------------------------------


def mass_weighted_hessian(hessian, masses) -> np.ndarray:
    """H_mw = M^-1/2 H M^-1/2.

    Args:
        hessian: [3N, 3N] or [N, 3, N, 3] Cartesian Hessian, eV/A^2.
        masses: [N] atomic masses, amu.

    Returns:
        [3N, 3N] mass-weighted Hessian, eV/A^2/amu (symmetrised).

    Raises:
        ValueError: wrong shapes, non-finite entries, non-positive masses, an asymmetric Hessian.
    """
    m = np.asarray(masses, dtype=np.float64)
    h = _hessian_2d(hessian, m.shape[0] if m.ndim == 1 else None)  # [3N, 3N] eV/A^2
    w = np.repeat(_masses(m, h.shape[0] // 3) ** -0.5, 3)  # [3N] amu^-1/2
    return w[:, None] * h * w[None, :]


def _rigid_vectors(positions: np.ndarray, masses: np.ndarray, linear_tol: float) -> np.ndarray:
    """Orthonormal translations and rotations in mass-weighted coordinates, [3N, n_rigid]."""
    n = positions.shape[0]
    sqrt_m = np.sqrt(masses)  # [N] amu^1/2
    r = positions - masses @ positions / masses.sum()  # [N, 3] A, about the centre of mass
    inertia = np.einsum("i,ia,ib->ab", masses, r, r)  # [3, 3] amu A^2
    inertia = np.eye(3) * np.trace(inertia) - inertia
    moments, axes = np.linalg.eigh(inertia)  # [3] amu A^2, [3, 3] principal axes as columns
    vectors = [np.kron(sqrt_m, np.eye(3)[a]) for a in range(3)]  # 3 x [3N], norm^2 = total mass
    for k in range(3):
        if moments[k] > linear_tol:  # |R_k|^2 = I_k: a zero moment is a rotation that moves nothing
            vectors.append((sqrt_m[:, None] * np.cross(axes[:, k], r)).reshape(3 * n))
    q, _ = np.linalg.qr(np.stack(vectors, axis=1))  # [3N, n_rigid]; already orthogonal, QR normalises
    return q


def _check_linear_tol(linear_tol: float) -> float:
    if not (np.isfinite(linear_tol) and linear_tol >= 0):
        raise ValueError(f"linear_tol must be a finite non-negative moment of inertia (amu A^2), got {linear_tol}")
    return float(linear_tol)


def rigid_body_projector(positions, masses, *, linear_tol: float = LINEAR_TOL) -> tuple[np.ndarray, int]:
    """Projector onto vibrations: removes translations and rotations in mass-weighted coordinates.

    Builds the 3 translations and the rotations about the principal axes through the centre of mass
    (Eckart conditions), mass-weighted, drops rotations whose principal moment is below `linear_tol`
    (one for a linear molecule, all three for an atom) and orthonormalises them into Q [3N, n_rigid].

    Args:
        positions: [N, 3] Angstrom.
        masses: [N] amu (ones for a projection in plain Cartesian coordinates).
        linear_tol: amu A^2; a principal moment of inertia at or below it counts as zero. The default
            1e-6 puts an H atom within 1e-3 A of the axis (a C atom within 3e-4 A) on it. The bundled
            DFT minima of HCN and HNC have I_min = 2e-10 and 1.7e-7 amu A^2 (linear); the nearly
            collinear H2...CO complex 7e-5 (1e-5 with unit masses): non-linear, as in PySCF, whose
            threshold is ~5e-6 amu A^2.

    Returns:
        (P, n_rigid): P = I - Q Q^T [3N, 3N], symmetric and idempotent, acting on mass-weighted
        vectors; n_rigid = 6, 5 (linear) or 3 (atom).

    Raises:
        ValueError: wrong shapes, non-finite entries, non-positive masses, negative linear_tol.
    """
    r = _positions(positions)
    q = _rigid_vectors(r, _masses(masses, r.shape[0]), _check_linear_tol(linear_tol))  # [3N, n_rigid]
    return np.eye(q.shape[0]) - q @ q.T, q.shape[1]


def _vibrational_basis(q: np.ndarray) -> np.ndarray:
    """Orthonormal basis of the complement of Q's columns, [3N, 3N - n_rigid]."""
    full, _ = np.linalg.qr(q, mode="complete")  # [3N, 3N]; the first n_rigid columns span Q
    return full[:, q.shape[1] :]


def _to_wavenumbers(eigenvalues: np.ndarray) -> np.ndarray:
    """sign(lambda) sqrt|lambda| in cm^-1 for lambda in eV/A^2/amu."""
    return np.sign(eigenvalues) * np.sqrt(np.abs(eigenvalues)) * CM1


# --- analysis -----------------------------------------------------------------------------------------------------


def harmonic_analysis(
    numbers,
    positions,
    hessian,
    *,
    masses=None,
    project: bool = True,
    linear_tol: float = LINEAR_TOL,
) -> Harmonic:
    """Normal modes and harmonic frequencies of one molecule.

    Args:
        numbers: [N] atomic numbers (int).
        positions: [N, 3] Angstrom.
        hessian: [3N, 3N] or [N, 3, N, 3] Cartesian Hessian, eV/A^2.
        masses: [N] amu; default the standard atomic weights `ase.data.atomic_masses[numbers]`.
        project: remove translations and rotations (see `rigid_body_projector`) and return
            M = 3N - 6 modes (3N - 5 for a linear molecule, 0 for an atom); False: all M = 3N
            eigenpairs of the mass-weighted Hessian, as ASE's `VibrationsData` (which does not project).
        linear_tol: amu A^2, see `rigid_body_projector`.

    Returns:
        `Harmonic`: frequencies [M] cm^-1 (imaginary ones negative, ascending), modes [M, N, 3],
        eigenvalues [M] eV/A^2/amu, reduced_masses [M] amu, n_rigid.

    Raises:
        ValueError: wrong shapes, N mismatch, non-finite entries, non-positive masses.
    """
    m = _default_masses(numbers)  # [N] amu, also checks numbers
    if masses is not None:
        m = _masses(masses, m.shape[0])
    n = m.shape[0]
    r = _positions(positions, n)  # [N, 3] A
    h_mw = mass_weighted_hessian(_hessian_2d(hessian, n), m)  # [3N, 3N] eV/A^2/amu
    if project:
        q = _rigid_vectors(r, m, _check_linear_tol(linear_tol))  # [3N, n_rigid]
        b = _vibrational_basis(q)  # [3N, M]
        eigenvalues, c = np.linalg.eigh(b.T @ h_mw @ b)  # [M] eV/A^2/amu, [M, M]
        vectors, n_rigid = b @ c, q.shape[1]  # [3N, M] orthonormal, mass-weighted
    else:
        eigenvalues, vectors = np.linalg.eigh(h_mw)  # [3N], [3N, 3N]
        n_rigid = 0
    modes = vectors.T.reshape(-1, n, 3) * (m**-0.5)[None, :, None]  # [M, N, 3] Cartesian, amu^-1/2
    reduced_masses = 1.0 / np.einsum("kia,kia->k", modes, modes)  # [M] amu
    return Harmonic(_to_wavenumbers(eigenvalues), modes, eigenvalues, reduced_masses, n_rigid)


def hessian_eigenvalues(
    hessian,
    positions=None,
    masses=None,
    project: bool = False,
    *,
    linear_tol: float = LINEAR_TOL,
) -> np.ndarray:
    """Ascending eigenvalues of a Hessian, optionally with translations and rotations projected out.

    With `masses=None` (the default) these are the eigenvalues of the Cartesian Hessian itself, eV/A^2:
    the quantity to compare between a model and the reference (eigenvalue MAE). With `project`, the
    Hessian is restricted to the complement of the rigid-body displacements in plain Cartesian
    coordinates (unit masses: translations, and rotations about the centroid; in Cartesian coordinates
    that subspace does not depend on the masses). With `masses` given, the eigenvalues are those of the
    mass-weighted Hessian instead, eV/A^2/amu, projected as in `harmonic_analysis`. For a Hessian that
    vanishes on the rigid-body motions (a stationary point, exact invariance) both give the same number
    of negative eigenvalues (Sylvester's law of inertia); see `count_negative` for when they differ.

    Args:
        hessian: [3N, 3N] or [N, 3, N, 3] eV/A^2.
        positions: [N, 3] Angstrom; needed when `project`.
        masses: [N] amu or None (see above).
        project: drop the n_rigid rigid-body directions (6, 5 for linear, 3 for an atom).
        linear_tol: see `rigid_body_projector` (amu A^2 with masses, A^2 without).

    Returns:
        [3N] or, projected, [3N - n_rigid] eigenvalues, eV/A^2 (eV/A^2/amu with `masses`).

    Raises:
        ValueError: wrong shapes, N mismatch, non-finite entries, `project` without positions.
    """
    h = _hessian_2d(hessian)  # [3N, 3N] eV/A^2
    n = h.shape[0] // 3
    weights = np.ones(n) if masses is None else _masses(masses, n)  # [N] amu, or 1
    if masses is not None:
        h = mass_weighted_hessian(h, weights)  # [3N, 3N] eV/A^2/amu
    if not project:
        return np.linalg.eigvalsh(h)
    if positions is None:
        raise ValueError("hessian_eigenvalues(project=True) needs positions [N, 3]")
    b = _vibrational_basis(_rigid_vectors(_positions(positions, n), weights, _check_linear_tol(linear_tol)))
    return np.linalg.eigvalsh(b.T @ h @ b)  # [3N - n_rigid]


def count_negative(
    hessian, positions, masses=None, *, tol: float = NEGATIVE_TOL, linear_tol: float = LINEAR_TOL
) -> int:
    """Number of negative eigenvalues of the projected Hessian: 0 at a minimum, 1 at a transition state.

    The eigenvalues are `hessian_eigenvalues(hessian, positions, masses, project=True)`. Pass the masses
    to count as `harmonic_analysis` does (imaginary frequencies, the usual definition of a minimum or
    a saddle). At a stationary point with a rigid-body-invariant Hessian both choices give the same
    count; they can differ when the Hessian violates the invariance on soft modes. Of the bundled
    DFT geometries, the weakly bound H2...CO product of `h2co_h2_co` has one negative eigenvalue
    (-0.17 eV/A^2) in Cartesian coordinates and none mass-weighted (its lowest frequency is 32 cm^-1).

    Args:
        hessian: [3N, 3N] or [N, 3, N, 3] eV/A^2.
        positions: [N, 3] Angstrom.
        masses: [N] amu, or None for the Cartesian Hessian (see `hessian_eigenvalues`).
        tol: counts eigenvalues below -tol, eV/A^2 (eV/A^2/amu with masses), so that numerical noise in
            the rigid-body remainders is not counted. 1e-3 eV/A^2/amu is an imaginary frequency of
            16 cm^-1; a transition state's negative eigenvalue is of order -0.1 to -10.
        linear_tol: see `rigid_body_projector`.

    Returns:
        The count (int).

    Raises:
        ValueError: wrong shapes, N mismatch, non-finite entries, negative tol.
    """
    if not (np.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be finite and non-negative, got {tol}")
    eigenvalues = hessian_eigenvalues(hessian, positions, masses, project=True, linear_tol=linear_tol)
    return int(np.count_nonzero(eigenvalues < -tol))


# --- ASE bridges --------------------------------------------------------------------------------------------------


def to_vibrations_data(atoms: Atoms, hessian, *, project: bool = False) -> VibrationsData:
    """An `ase.vibrations.VibrationsData` for `atoms` and a phljax Hessian.

    `VibrationsData` diagonalises the Hessian it is given without projecting; by default it gets the
    raw Hessian, so that its frequencies are ASE's own (3N of them, the 6 rigid-body ones near zero).
    With `project`, it gets the Cartesian Hessian M^1/2 P H_mw P M^1/2 with the rigid-body motions
    projected out (P from `rigid_body_projector` with the atoms' masses): its 3N frequencies are then
    `harmonic_analysis`'s, plus n_rigid exact zeros.

    Args:
        atoms: `ase.Atoms` of N atoms, positions Angstrom; its masses are used (`atoms.get_masses()`).
        hessian: [3N, 3N] or [N, 3, N, 3] eV/A^2.
        project: pass the projected Hessian instead of the raw one.

    Returns:
        `VibrationsData` (all atoms active).

    Raises:
        ValueError: wrong shapes, N mismatch, non-finite entries.
    """
    n = len(atoms)
    h = _hessian_2d(hessian, n)  # [3N, 3N] eV/A^2
    if project:
        m = _masses(atoms.get_masses(), n)  # [N] amu
        p, _ = rigid_body_projector(atoms.get_positions(), m)  # [3N, 3N]
        s = np.repeat(np.sqrt(m), 3)  # [3N] amu^1/2
        h = s[:, None] * (p @ mass_weighted_hessian(h, m) @ p) * s[None, :]
        h = 0.5 * (h + h.T)
    return VibrationsData.from_2d(atoms, h)


def ideal_gas_thermo(
    atoms: Atoms,
    hessian,
    *,
    geometry: str | None = None,
    symmetrynumber: int = 1,
    spin: float = 0,
    potentialenergy: float = 0.0,
    ignore_imag_modes: bool = False,
    linear_tol: float = LINEAR_TOL,
) -> IdealGasThermo:
    """An `ase.thermochemistry.IdealGasThermo` from the projected harmonic frequencies.

    The vibrational energies h c nu (eV) are those of `harmonic_analysis(..., project=True)` with the
    atoms' masses, so exactly 3N - 6 (3N - 5, 0) of them are passed (`vib_selection='all'`); imaginary
    frequencies are passed as imaginary energies, which ASE rejects unless `ignore_imag_modes`
    (then it drops them, e.g. the reaction coordinate of a transition state).

    Args:
        atoms: `ase.Atoms` of N atoms, positions Angstrom (masses from `atoms.get_masses()`).
        hessian: [3N, 3N] or [N, 3, N, 3] eV/A^2.
        geometry: 'monatomic', 'linear' or 'nonlinear'; None: from the number of rigid-body modes
            (3, 5, 6) that the projection found.
        symmetrynumber: rotational symmetry number sigma.
        spin: total electronic spin S (0 for singlets).
        potentialenergy: electronic energy E_elec, eV.
        ignore_imag_modes: as in `IdealGasThermo`.
        linear_tol: amu A^2, see `rigid_body_projector`.

    Returns:
        `IdealGasThermo` (enthalpy, entropy, Gibbs energy in eV, eV/K).

    Raises:
        ValueError: wrong shapes, N mismatch, non-finite entries, an unknown geometry, a geometry that
            contradicts the projection.
    """
    n = len(atoms)
    numbers, positions, masses = atoms.get_atomic_numbers(), atoms.get_positions(), atoms.get_masses()
    result = harmonic_analysis(numbers, positions, hessian, masses=masses, linear_tol=linear_tol)
    detected = {3: "monatomic", 5: "linear", 6: "nonlinear"}.get(result.n_rigid)
    if detected is None:
        raise ValueError(f"linear_tol={linear_tol} amu A^2 leaves {result.n_rigid} rigid-body modes for {n} atoms")
    if geometry is None:
        geometry = detected
    elif geometry not in ("monatomic", "linear", "nonlinear"):
        raise ValueError(f"geometry must be 'monatomic', 'linear' or 'nonlinear', got {geometry!r}")
    elif geometry != detected:
        raise ValueError(
            f"geometry {geometry!r} contradicts the {result.n_rigid} rigid-body modes found for {n} atoms "
            f"({detected!r}); adjust linear_tol if the molecule is near-linear"
        )
    nu = result.frequencies  # [M] cm^-1
    vib_energies = np.where(nu >= 0, nu + 0j, 1j * np.abs(nu)) * INVCM  # [M] eV, imaginary for nu < 0
    return IdealGasThermo(
        vib_energies=list(vib_energies),
        geometry=geometry,
        potentialenergy=float(potentialenergy),
        atoms=atoms,
        symmetrynumber=symmetrynumber,
        spin=spin,
        vib_selection="all",
        ignore_imag_modes=ignore_imag_modes,
    )
