"""Normal-mode sampling (NMS): thermally distorted geometries around a minimum.

At a minimum R0 with Hessian H, the harmonic potential in mass-weighted normal coordinates Q_k
is V = sum_k omega_k^2 Q_k^2 / 2. Its classical Boltzmann distribution at temperature T makes
every Q_k an independent Gaussian with variance k_B T / omega_k^2, so each mode carries on
average k_B T / 2 of potential energy. We draw exactly that (one independent Gaussian amplitude
per real vibrational mode, translations and rotations projected out, soft and imaginary modes
skipped) and displace R = R0 + M^-1/2 L Q. Modes that are rotations in disguise (librations,
hindered rotations: see :func:`rectilinear_stretch`) can be frozen as well, because a straight
step along them by their thermal amplitude tears bonds apart. This is the harmonic-Boltzmann variant of the NMS
used for ANI-1 (which instead splits a random fraction c_k of a total energy between modes).

Units: positions in Angstrom, Hessians in Hartree/Bohr^2, masses in amu, omega^2 in
Hartree/(Bohr^2 amu), temperatures in Kelvin, harmonic energies in Hartree.

References:
    J. S. Smith, O. Isayev, A. E. Roitberg, "ANI-1: an extensible neural network potential with
    DFT accuracy at force field computational cost", Chem. Sci. 8, 3192 (2017), Sec. "Normal
    mode sampling".
    PySCF ``pyscf.hessian.thermo.harmonic_analysis`` (projection of translations/rotations).
"""

from __future__ import annotations

import numpy as np
from ase.build import molecule
from ase.data import covalent_radii

from phljax.units import DFT_BOHR, DFT_KB

#: Default sampling temperature, Kelvin.
NMS_TEMPERATURE = 500.0
#: Modes softer than this are not displaced by default, cm^-1.
MIN_FREQ_CM = 50.0
#: Two atoms are bonded when closer than this times the sum of their covalent radii.
BOND_SCALE = 1.2


def normal_modes(
    numbers: np.ndarray,  # [N]
    positions: np.ndarray,  # [N, 3] Angstrom
    hessian: np.ndarray,  # [N, 3, N, 3] Hartree/Bohr^2
) -> dict[str, np.ndarray]:
    """Harmonic analysis with translations and rotations projected out (via PySCF).

    Args:
        numbers: atomic numbers, [N] int.
        positions: Cartesian positions of the minimum, [N, 3] Angstrom.
        hessian: Cartesian Hessian at ``positions``, [N, 3, N, 3] (or [3N, 3N]) Hartree/Bohr^2.

    Returns:
        ``{"freq_cm": [M] cm^-1 (imaginary modes as negative numbers), "omega2": [M]
        Hartree/(Bohr^2 amu) (eigenvalues of the mass-weighted Hessian, negative if imaginary),
        "modes": [M, N, 3] amu^-1/2 (Cartesian displacement per unit mass-weighted normal
        coordinate, i.e. M^-1/2 times an orthonormal eigenvector)}`` with M = 3N-6 (3N-5 for a
        linear molecule).

    Raises:
        ValueError: on inconsistent shapes.
    """
    from pyscf import gto  # noqa: PLC0415 (optional: the `data` extra)
    from pyscf.hessian import thermo  # noqa: PLC0415 (optional: the `data` extra)

    numbers = np.asarray(numbers, dtype=int)
    n = numbers.shape[0]
    h = np.asarray(hessian, dtype=np.float64)
    if h.shape == (3 * n, 3 * n):
        h = h.reshape(n, 3, n, 3)
    if h.shape != (n, 3, n, 3) or np.shape(positions) != (n, 3):
        raise ValueError(
            f"expected positions [{n}, 3] and hessian [{n}, 3, {n}, 3], got "
            f"{np.shape(positions)} and {np.shape(hessian)}"
        )
    # The basis is irrelevant: harmonic_analysis only uses masses and coordinates.
    mol = gto.M(
        atom=[(int(z), tuple(p)) for z, p in zip(numbers, np.asarray(positions, float), strict=True)],
        unit="Angstrom",
        basis="sto-3g",
        spin=int(numbers.sum()) % 2,
        verbose=0,
    )
    res = thermo.harmonic_analysis(mol, h.transpose(0, 2, 1, 3), imaginary_freq=False)
    return {
        "freq_cm": np.asarray(res["freq_wavenumber"], dtype=np.float64),
        "omega2": np.asarray(res["force_const_au"], dtype=np.float64),
        "modes": np.asarray(res["norm_mode"], dtype=np.float64),
    }


def sample_normal_modes(
    positions: np.ndarray,  # [N, 3] Angstrom
    modes: np.ndarray,  # [M, N, 3] amu^-1/2
    omega2: np.ndarray,  # [M] Hartree/(Bohr^2 amu)
    freq_cm: np.ndarray,  # [M] cm^-1
    n_samples: int,
    temperature: float = NMS_TEMPERATURE,
    rng: np.random.Generator | None = None,
    min_freq_cm: float = MIN_FREQ_CM,
    frozen: np.ndarray | None = None,  # [M] bool
) -> tuple[np.ndarray, np.ndarray]:
    """Draw geometries from the classical harmonic Boltzmann distribution at ``temperature``.

    Each real mode with frequency >= ``min_freq_cm`` and not ``frozen`` gets an independent
    amplitude Q_k ~ N(0, k_B T / omega_k^2) (Bohr amu^1/2); the displacement is sum_k Q_k modes[k].
    Softer and imaginary modes are left undisplaced (their harmonic amplitude is unbounded), and
    so are frozen ones (e.g. those of :func:`rectilinear_stretch` above a bound).

    Args:
        positions: minimum geometry, [N, 3] Angstrom.
        modes: Cartesian normal modes, [M, N, 3] amu^-1/2 (from :func:`normal_modes`).
        omega2: squared angular frequencies, [M] Hartree/(Bohr^2 amu).
        freq_cm: frequencies, [M] cm^-1 (negative for imaginary modes).
        n_samples: number of geometries to draw.
        temperature: temperature, Kelvin.
        rng: numpy Generator (seed it for reproducibility); a fresh unseeded one if None.
        min_freq_cm: modes below this frequency (cm^-1) are not displaced.
        frozen: modes not to displace either, [M] bool (None: none).

    Returns:
        ``(samples, harmonic_energy)``: geometries [n_samples, N, 3] Angstrom and their
        harmonic potential energies sum_k omega_k^2 Q_k^2 / 2, [n_samples] Hartree (mean
        M_used k_B T / 2).

    Raises:
        ValueError: on bad shapes, a negative temperature or no mode above ``min_freq_cm``.
    """
    positions = np.asarray(positions, dtype=np.float64)
    modes = np.asarray(modes, dtype=np.float64)
    omega2 = np.asarray(omega2, dtype=np.float64)
    freq_cm = np.asarray(freq_cm, dtype=np.float64)
    n = positions.shape[0]
    m = modes.shape[0]
    if positions.shape != (n, 3) or modes.shape != (m, n, 3) or omega2.shape != (m,) or freq_cm.shape != (m,):
        raise ValueError(
            f"inconsistent shapes: positions {positions.shape}, modes {modes.shape}, "
            f"omega2 {omega2.shape}, freq_cm {freq_cm.shape}"
        )
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 K, got {temperature}")
    use = freq_cm >= min_freq_cm
    if frozen is not None:
        use &= ~np.asarray(frozen, dtype=bool)
    if not np.any(use):
        raise ValueError(f"no vibrational mode above {min_freq_cm} cm^-1 and not frozen (frequencies {freq_cm})")
    rng = np.random.default_rng() if rng is None else rng
    kt = DFT_KB * temperature  # Hartree
    sigma = np.sqrt(kt / omega2[use])  # [M_used] Bohr amu^1/2
    q = rng.standard_normal((n_samples, int(use.sum()))) * sigma  # [S, M_used]
    disp_bohr = np.einsum("sk,kia->sia", q, modes[use])  # [S, N, 3] Bohr
    energy = 0.5 * np.sum(omega2[use] * q**2, axis=1)  # [S] Hartree
    return positions[None] + disp_bohr * DFT_BOHR, energy


def distorted_g2(
    name: str,
    rng: np.random.Generator,
    sigma: float = 0.03,  # Angstrom
) -> tuple[np.ndarray, np.ndarray]:
    """ase's g2 geometry of ``name`` with Gaussian noise (std ``sigma`` Angstrom) on every coordinate.

    A reproducible off-minimum geometry (non-zero forces) for derivative checks and cost
    measurements. Returns (numbers [N] int, positions [N, 3] Angstrom); draws from ``rng``.
    """

    atoms = molecule(name)
    return atoms.numbers, atoms.positions + rng.normal(0.0, sigma, atoms.positions.shape)


def bonded_pairs(
    numbers: np.ndarray, positions: np.ndarray, scale: float = BOND_SCALE
) -> tuple[np.ndarray, np.ndarray]:
    """Index arrays (i, j), i < j, of the pairs closer than ``scale`` times their summed covalent radii."""

    r = covalent_radii[np.asarray(numbers)]
    positions = np.asarray(positions, dtype=np.float64)
    d = np.linalg.norm(positions[:, None] - positions[None], axis=-1)
    return np.nonzero(np.triu(d < scale * (r[:, None] + r[None]), k=1))


def rectilinear_stretch(
    numbers: np.ndarray,  # [N]
    positions: np.ndarray,  # [N, 3] Angstrom
    modes: np.ndarray,  # [M, N, 3] amu^-1/2
    omega2: np.ndarray,  # [M] Hartree/(Bohr^2 amu)
    temperature: float = NMS_TEMPERATURE,  # Kelvin
) -> np.ndarray:  # [M] dimensionless
    """How much a straight-line step along each mode lengthens bonds that it should only turn.

    Normal modes are straight lines in Cartesian space. For stretches and bends that is a good
    picture over a thermal amplitude, but a libration or hindered rotation (a weakly bound H2
    turning against CO2, an NH2 wag, a methyl torsion) moves atoms along circles, and a straight
    step by its large thermal amplitude pulls its bonds apart: at 500 K such samples of a CO2...H2
    complex had H-H stretched to 2.5 A, 157 kcal/mol above the minimum. The measure, for mode k
    with thermal RMS amplitude sigma_k = sqrt(k_B T) / omega_k, is the even part of the bond
    length change, max over bonded pairs of (d(+sigma_k) + d(-sigma_k) - 2 d_0) / (2 d_0). Odd
    (first-order) changes, which stretching modes are made of, cancel in it. For the stretches,
    bends and torsions of the bundled reactions it is at most 0.026; for the rotation-like modes
    above, 0.06-0.6.

    Returns:
        [M] second-order relative bond lengthening at one thermal RMS amplitude (0 for modes
        with omega2 <= 0 and for molecules without bonds).
    """
    positions = np.asarray(positions, dtype=np.float64)
    i, j = bonded_pairs(numbers, positions)
    out = np.zeros(len(omega2))
    if len(i) == 0:
        return out

    def lengths(x):
        return np.linalg.norm(x[i] - x[j], axis=-1)

    d0 = lengths(positions)
    for k, w2 in enumerate(np.asarray(omega2, dtype=np.float64)):
        if w2 > 0:
            step = np.sqrt(DFT_KB * temperature / w2) * modes[k] * DFT_BOHR  # [N, 3] Angstrom
            out[k] = np.max((lengths(positions + step) + lengths(positions - step) - 2 * d0) / (2 * d0))
    return out
