"""The Chai--Head-Gordon damped C6 dispersion term of omegaB97X-D, with analytic derivatives.

libxc's ``hyb_gga_xc_wb97x_d`` is only the exchange-correlation part of omegaB97X-D; the
functional was fitted together with an empirical atom-pairwise dispersion correction that a
code has to add on top:

    E_disp = -s6 * sum_{i<j} C6_ij / r_ij^6 * f_damp(r_ij),
    f_damp(r) = 1 / (1 + a * (r / R_r)^-12),
    C6_ij = sqrt(C6_i * C6_j),   R_r = R_i + R_j,   a = 6.0,   s6 = 1.0,

with Grimme's DFT-D2 atomic C6 coefficients and van der Waals radii (J. Comput. Chem. 27, 1787
(2006), Table 1). The damped pair term simplifies to C6 r^6 / (r^12 + a R_r^12), which is what
is differentiated here.

Everything in this module works in atomic units: positions in Bohr, energies in Hartree,
gradients in Hartree/Bohr, Hessians in Hartree/Bohr^2, so the results can be added directly to
PySCF's SCF energy, ``nuc_grad_method()`` gradient and ``Hessian()`` output.

References:
    J.-D. Chai, M. Head-Gordon, "Long-range corrected hybrid density functionals with damped
    atom-atom dispersion corrections", Phys. Chem. Chem. Phys. 10, 6615 (2008), Eqs. (4)-(5).
    S. Grimme, "Semiempirical GGA-type density functional constructed with a long-range
    dispersion correction", J. Comput. Chem. 27, 1787 (2006), Table 1.
    Psi4's ``-CHG`` dispersion (psi4/src/psi4/libdisp/dispersion.cc, dispersion_defines.h)
    uses the same form, a = 6.0 and the same tables (C6 in Hartree Bohr^6 = J nm^6 mol^-1 times
    17.34525495; radii in Bohr).
"""

from __future__ import annotations

import numpy as np

from phljax.units import DFT_BOHR, DFT_HARTREE_KJ_MOL

#: 1 J nm^6 mol^-1 in Hartree Bohr^6: 1e-3 / (kJ/mol per Hartree) * (Bohr per nm)^6.
JNM6_PER_MOL_TO_HARTREE_BOHR6 = 1e-3 / DFT_HARTREE_KJ_MOL * (10.0 / DFT_BOHR) ** 6

#: Grimme D2 atomic C6 coefficients, J nm^6 mol^-1, by atomic number (J. Comput. Chem. 27, 1787).
C6_D2_JNM6: dict[int, float] = {1: 0.14, 6: 1.75, 7: 1.23, 8: 0.70}
#: Grimme D2 van der Waals radii R0, Angstrom, by atomic number (same table; these already
#: include the 1.1 scaling of the raw DFT-D3 r0 values).
R0_D2_ANGSTROM: dict[int, float] = {1: 1.001, 6: 1.452, 7: 1.397, 8: 1.342}
#: Damping steepness a of Chai and Head-Gordon (dimensionless).
CHG_A = 6.0
#: Global scaling s6 of omegaB97X-D (dimensionless).
CHG_S6 = 1.0


def _pair_tables(numbers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """C6_ij (Hartree Bohr^6) and R_r = R_i + R_j (Bohr) for all pairs, each [N, N].

    Raises:
        ValueError: if an element has no D2 parameters in this module.
    """
    numbers = np.asarray(numbers, dtype=int)
    missing = sorted({int(z) for z in numbers} - set(C6_D2_JNM6))
    if missing:
        raise ValueError(f"no D2 dispersion parameters for atomic numbers {missing}; available: {sorted(C6_D2_JNM6)}")
    c6 = np.array([C6_D2_JNM6[int(z)] for z in numbers]) * JNM6_PER_MOL_TO_HARTREE_BOHR6
    r0 = np.array([R0_D2_ANGSTROM[int(z)] for z in numbers]) / DFT_BOHR
    return np.sqrt(np.outer(c6, c6)), r0[:, None] + r0[None, :]


def _check_inputs(numbers, positions) -> tuple[np.ndarray, np.ndarray]:
    numbers = np.asarray(numbers, dtype=int)
    positions = np.asarray(positions, dtype=np.float64)
    if numbers.ndim != 1 or positions.shape != (numbers.shape[0], 3):
        raise ValueError(f"expected numbers [N] and positions [N, 3], got {numbers.shape} and {positions.shape}")
    return numbers, positions


def _radial_derivatives(
    r: np.ndarray, c6: np.ndarray, rr: np.ndarray, a: float, s6: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pair energy e(r) (Hartree) and its first and second radial derivatives.

    e(r) = -s6 C6 g(r) with g(r) = r^6 / (r^12 + b), b = a R_r^12 (r, R_r in Bohr).
    """
    b = a * rr**12
    r5 = r**5
    r12 = r**12
    d = r12 + b
    g = r**6 / d
    dg = 6.0 * r5 * (b - r12) / d**2
    # d/dr [6 (b r^5 - r^17) / d^2] = 6 [(5 b r^4 - 17 r^16) d - 24 r^11 (b r^5 - r^17)] / d^3
    d2g = 6.0 * ((5.0 * b * r**4 - 17.0 * r**16) * d - 24.0 * r**11 * (b * r5 - r**17)) / d**3
    pref = -s6 * c6
    return pref * g, pref * dg, pref * d2g


def chg_dispersion(
    numbers: np.ndarray,  # [N] atomic numbers
    positions: np.ndarray,  # [N, 3] Bohr
    a: float = CHG_A,
    s6: float = CHG_S6,
) -> tuple[float, np.ndarray, np.ndarray]:
    """Chai--Head-Gordon damped dispersion energy, gradient and Hessian of omegaB97X-D.

    Args:
        numbers: atomic numbers, [N] int (H, C, N, O supported).
        positions: Cartesian positions, [N, 3] Bohr.
        a: damping steepness (dimensionless), 6.0 for omegaB97X-D.
        s6: global scaling (dimensionless), 1.0 for omegaB97X-D.

    Returns:
        ``(energy, gradient, hessian)``: energy in Hartree (float), gradient dE/dR [N, 3] in
        Hartree/Bohr, Hessian d2E/dR_ia dR_jb [N, 3, N, 3] in Hartree/Bohr^2 (exactly
        symmetric and translation invariant by construction).

    Raises:
        ValueError: on bad shapes, unsupported elements or coincident atoms.

    References:
        Chai & Head-Gordon, Phys. Chem. Chem. Phys. 10, 6615 (2008); Grimme, J. Comput. Chem.
        27, 1787 (2006).
    """
    numbers, positions = _check_inputs(numbers, positions)
    n = numbers.shape[0]
    energy = 0.0
    grad = np.zeros((n, 3))
    hess = np.zeros((n, 3, n, 3))
    if n < 2:
        return energy, grad, hess
    c6, rr = _pair_tables(numbers)
    iu, ju = np.triu_indices(n, k=1)
    dvec = positions[iu] - positions[ju]  # [P, 3] Bohr, r_i - r_j
    r = np.linalg.norm(dvec, axis=-1)  # [P] Bohr
    if np.any(r < 1e-8):
        raise ValueError("coincident atoms: dispersion is undefined at r = 0")
    e, de, d2e = _radial_derivatives(r, c6[iu, ju], rr[iu, ju], a, s6)
    energy = float(e.sum())
    u = dvec / r[:, None]  # [P, 3] unit vectors from j to i
    g_pair = de[:, None] * u  # dE/dR_i for each pair [P, 3]
    np.add.at(grad, iu, g_pair)
    np.add.at(grad, ju, -g_pair)
    uu = u[:, :, None] * u[:, None, :]  # [P, 3, 3]
    block = d2e[:, None, None] * uu + (de / r)[:, None, None] * (np.eye(3) - uu)  # d2E/dR_i dR_i
    for p, (i, j) in enumerate(zip(iu, ju, strict=True)):
        hess[i, :, i, :] += block[p]
        hess[j, :, j, :] += block[p]
        hess[i, :, j, :] -= block[p]
        hess[j, :, i, :] -= block[p]
    return energy, grad, hess


def chg_dispersion_energy(
    numbers: np.ndarray,  # [N]
    positions: np.ndarray,  # [N, 3] Bohr
    a: float = CHG_A,
    s6: float = CHG_S6,
) -> float:
    """Chai--Head-Gordon dispersion energy only, Hartree (positions in Bohr).

    Args:
        numbers: atomic numbers, [N] int.
        positions: Cartesian positions, [N, 3] Bohr.
        a: damping steepness (dimensionless).
        s6: global scaling (dimensionless).

    Returns:
        The dispersion energy in Hartree.

    Raises:
        ValueError: on bad shapes, unsupported elements or coincident atoms.
    """
    numbers, positions = _check_inputs(numbers, positions)
    n = numbers.shape[0]
    if n < 2:
        return 0.0
    c6, rr = _pair_tables(numbers)
    iu, ju = np.triu_indices(n, k=1)
    r = np.linalg.norm(positions[iu] - positions[ju], axis=-1)
    if np.any(r < 1e-8):
        raise ValueError("coincident atoms: dispersion is undefined at r = 0")
    e, _, _ = _radial_derivatives(r, c6[iu, ju], rr[iu, ju], a, s6)
    return float(e.sum())
