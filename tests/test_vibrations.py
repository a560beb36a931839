"""phljax.vibrations: harmonic frequencies agree with PySCF and ASE, and behave as physics says.

PySCF's `harmonic_analysis` on the bundled DFT Hessians (same masses, so only the algorithm is
compared), invariance under rotations, translations and reflections, the 3N - 5 modes of linear
molecules against a CO2 model with closed-form frequencies, ASE's finite-difference `Vibrations` on
an EMT water, and the ASE bridges.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from ase import Atoms
from ase.build import molecule
from ase.calculators.emt import EMT
from ase.data import atomic_masses, chemical_symbols
from ase.optimize import BFGS
from ase.vibrations import Vibrations
from pyscf import gto
from pyscf.hessian import thermo as pyscf_thermo

import phljax
from phljax import vibrations as vib
from phljax.units import BOHR, HARTREE


@pytest.fixture(scope="module")
def rtp():
    """The 36 reactant/product/transition-state geometries of the bundled reaction set (DFT Hessians)."""
    return phljax.read_h5(phljax.data.bundled_path("chon_reactions-RTP.h5"))


def _non_degenerate(frequencies, gap=1.0):
    """[M] bool: modes more than `gap` cm^-1 from both neighbours (their eigenvector is defined up to sign)."""
    far = np.diff(frequencies) > gap
    keep = np.ones(frequencies.shape, bool)
    keep[:-1] &= far
    keep[1:] &= far
    return keep


def _cosines(a, b):
    """[M] |cos| of the angle between matching modes a[k], b[k] ([M, N, 3])."""
    dots = np.einsum("kia,kia->k", a, b)
    return np.abs(dots) / np.sqrt(np.einsum("kia,kia->k", a, a) * np.einsum("kia,kia->k", b, b))


def _rotation(rng):
    """A random proper rotation matrix [3, 3]."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q * np.linalg.det(q)


def _projected(hessian, positions, masses):
    """Cartesian Hessian [3N, 3N] eV/A^2 with the rigid-body motions removed: M^1/2 P H_mw P M^1/2."""
    p, _ = vib.rigid_body_projector(positions, masses)
    s = np.repeat(np.sqrt(masses), 3)
    h = s[:, None] * (p @ vib.mass_weighted_hessian(hessian, masses) @ p) * s[None, :]
    return 0.5 * (h + h.T)


# --- 1. PySCF -----------------------------------------------------------------------------------------------------


def test_frequencies_and_modes_match_pyscf_on_bundled_rtp(rtp):
    assert len(rtp) == 36
    worst_freq, worst_mode, n_compared = 0.0, 0.0, 0
    for mol in rtp:
        name = f"{mol.meta['reaction']}/{mol.meta['point']}"
        n = len(mol.numbers)
        assert mol.numbers.sum() % 2 == 0, name  # closed-shell neutral: spin=0 is a valid pyscf molecule
        atoms = [(chemical_symbols[z], tuple(r)) for z, r in zip(mol.numbers, mol.positions, strict=True)]
        pmol = gto.M(atom=atoms, unit="Angstrom", basis="sto-3g", charge=0, spin=0, verbose=0)
        masses = atomic_masses[mol.numbers]  # [N] amu, given to both
        # pyscf wants d2E/dR_p,x dR_q,y as hess[p, q, x, y] in Hartree/Bohr^2
        hess_au = mol.hessian.transpose(0, 2, 1, 3) / (HARTREE / BOHR**2)  # [N, N, 3, 3]
        ref = pyscf_thermo.harmonic_analysis(pmol, hess_au, mass=masses)  # projects translations and rotations
        freq_ref = ref["freq_wavenumber"]  # [M] cm^-1, complex (imaginary_freq=True) when any is imaginary
        freq_ref = freq_ref.real - np.abs(freq_ref.imag)  # imaginary ones as negative, as phljax returns them

        ours = vib.harmonic_analysis(mol.numbers, mol.positions, mol.hessian)
        expected_n = 3 * n - 5 if mol.meta["reaction"] == "hcn_hnc" and mol.meta["point"] != "ts" else 3 * n - 6
        assert ours.frequencies.shape == freq_ref.shape == (expected_n,), name
        assert ours.modes.shape == (expected_n, n, 3)
        assert ours.eigenvalues.shape == ours.reduced_masses.shape == (expected_n,)
        assert np.all(np.diff(ours.frequencies) >= 0), name
        worst_freq = max(worst_freq, np.abs(ours.frequencies - freq_ref).max())
        assert np.allclose(ours.frequencies, freq_ref, rtol=0, atol=0.1), name

        # imaginary frequencies: one at a transition state, none at a minimum; pyscf counts them the same
        expected_imaginary = int(mol.meta["point"] == "ts")
        assert ref["freq_error"] == ours.n_imaginary() == expected_imaginary, name
        assert vib.count_negative(mol.hessian, mol.positions, masses) == expected_imaginary, name

        # modes: the same Cartesian displacements M^-1/2 e (pyscf's norm_mode) up to sign, same reduced masses
        keep = _non_degenerate(ours.frequencies)
        n_compared += keep.sum()
        cos = _cosines(ours.modes[keep], ref["norm_mode"][keep])
        worst_mode = max(worst_mode, np.abs(1 - cos).max())
        assert np.allclose(cos, 1.0, rtol=0, atol=1e-8), name
        assert np.allclose(ours.reduced_masses[keep], ref["reduced_mass"][keep], rtol=1e-8), name
    # the algorithms are the same: what is left is the two codes' CODATA constants (~1e-9 relative)
    assert worst_freq < 1e-4, worst_freq
    assert worst_mode < 1e-10, worst_mode
    assert n_compared > 0.9 * sum(3 * len(m.numbers) - 6 for m in rtp), n_compared  # most modes are non-degenerate


# --- 2. invariance ------------------------------------------------------------------------------------------------


def test_projected_frequencies_invariant_under_rotation_translation_reflection():
    rng = np.random.default_rng(0)
    numbers = np.array([6, 8, 7, 1, 1, 1])
    n = len(numbers)
    masses = atomic_masses[numbers]
    positions = rng.normal(scale=1.2, size=(n, 3))  # [N, 3] A
    a = rng.normal(size=(3 * n, 3 * n))
    hessian = _projected(a @ a.T / n - 2.0 * np.eye(3 * n), positions, masses)  # symmetric, some negative modes
    ref = vib.harmonic_analysis(numbers, positions, hessian)
    assert ref.n_rigid == 6 and ref.frequencies.shape == (3 * n - 6,)
    assert ref.n_imaginary() > 0  # the invariance holds for saddles too
    # projection is idempotent, and without it the same spectrum comes back with 6 zeros
    again = vib.harmonic_analysis(numbers, positions, _projected(hessian, positions, masses))
    assert np.allclose(again.frequencies, ref.frequencies, atol=1e-8)
    full = vib.harmonic_analysis(numbers, positions, hessian, project=False)
    assert full.frequencies.shape == (3 * n,)
    small = np.argsort(np.abs(full.eigenvalues))[:6]
    assert np.allclose(full.eigenvalues[small], 0.0, atol=1e-10)
    assert np.allclose(np.delete(full.frequencies, small), ref.frequencies, atol=1e-6)

    # an asymmetric Hessian (finite differences) is symmetrised: only (H + H^T) / 2 counts
    skew = rng.normal(scale=1e-3, size=hessian.shape)
    skewed = vib.harmonic_analysis(numbers, positions, hessian + skew - skew.T)
    assert np.allclose(skewed.frequencies, ref.frequencies, rtol=0, atol=1e-8)

    keep = _non_degenerate(ref.frequencies)
    for transform in (_rotation(rng), -_rotation(rng)):  # a rotation, and a rotation times the inversion
        big = np.kron(np.eye(n), transform)  # [3N, 3N]: R on every atom
        moved = positions @ transform.T + rng.normal(scale=5.0, size=3)  # rotate (or reflect) and translate
        out = vib.harmonic_analysis(numbers, moved, big @ hessian @ big.T)
        assert np.allclose(out.frequencies, ref.frequencies, rtol=0, atol=1e-6)
        assert np.allclose(out.eigenvalues, ref.eigenvalues, rtol=0, atol=1e-10)
        # the modes rotate with the molecule
        assert np.allclose(_cosines(out.modes[keep], ref.modes[keep] @ transform.T), 1.0, atol=1e-8)
        # Cartesian (unit-mass) projected eigenvalues are invariant too
        assert np.allclose(
            vib.hessian_eigenvalues(big @ hessian @ big.T, moved, project=True),
            vib.hessian_eigenvalues(hessian, positions, project=True),
            atol=1e-10,
        )


def test_rigid_body_projector_removes_translations_and_rotations():
    rng = np.random.default_rng(3)
    positions = rng.normal(size=(5, 3))
    masses = rng.uniform(1.0, 16.0, size=5)
    p, n_rigid = vib.rigid_body_projector(positions, masses)
    assert n_rigid == 6 and p.shape == (15, 15)
    assert np.allclose(p, p.T) and np.allclose(p @ p, p, atol=1e-12) and np.isclose(np.trace(p), 9.0)
    sqrt_m = np.repeat(np.sqrt(masses), 3)
    omega, shift = rng.normal(size=3), rng.normal(size=3)
    rigid = np.cross(omega, positions) + shift  # [N, 3] an infinitesimal rigid motion, Cartesian
    assert np.allclose(p @ (sqrt_m * rigid.ravel()), 0.0, atol=1e-12)  # removed in mass-weighted coordinates
    assert vib.rigid_body_projector(positions[:1], masses[:1])[1] == 3  # an atom
    assert vib.rigid_body_projector(positions[:2], masses[:2])[1] == 5  # any diatomic is linear


# --- 3. linear molecules ------------------------------------------------------------------------------------------


def _co2_model(k_bond, k_bend, d, axis):
    """Positions [3, 3] A and Hessian [9, 9] eV/A^2 of O=C=O along `axis` at its minimum.

    E = k_bond/2 sum_b (|r_O - r_C| - d)^2 + k_bend/2 |u_1 + u_2|^2 with u the unit C->O vectors
    (|u_1 + u_2| ~ the bend angle). At the minimum H = sum_b k_bond J_b^T J_b + k_bend J^T J.
    """
    u = axis / np.linalg.norm(axis)
    positions = np.stack([-d * u, 0 * u, d * u])  # O, C, O
    h = np.zeros((3, 3, 3, 3))
    for o in (0, 2):  # the two C-O springs: k u u^T blocks
        block = k_bond * np.outer(u, u)
        h[o, :, o, :] += block
        h[1, :, 1, :] += block
        h[o, :, 1, :] -= block
        h[1, :, o, :] -= block
    perp = (np.eye(3) - np.outer(u, u)) / d  # d u_b / d r_O for either bond (u_1 = -u_2)
    jac = np.concatenate([perp, -2 * perp, perp], axis=1)  # [3, 9] d(u_1 + u_2) / dR
    return positions, h.reshape(9, 9) + k_bend * jac.T @ jac


def test_linear_molecules_have_3n_minus_5_modes(rtp):
    m_o, m_c = atomic_masses[8], atomic_masses[6]
    k_bond, k_bend, d = 100.0, 4.0, 1.16  # eV/A^2, eV, A
    positions, hessian = _co2_model(k_bond, k_bend, d, axis=np.array([0.3, -1.1, 0.7]))
    out = vib.harmonic_analysis(np.array([8, 6, 8]), positions, hessian)
    assert out.n_rigid == 5 and out.frequencies.shape == (4,) and out.modes.shape == (4, 3, 3)
    # closed forms (Herzberg): bend (twice) 2 k_bend / d^2 (1/m_O + 2/m_C), symmetric k/m_O, antisymmetric
    # k (1/m_O + 2/m_C)
    exact = np.sort(
        [2 * k_bend / d**2 * (1 / m_o + 2 / m_c)] * 2 + [k_bond / m_o, k_bond * (1 / m_o + 2 / m_c)]
    )  # eV/A^2/amu
    assert np.allclose(out.eigenvalues, exact, rtol=1e-10)
    assert np.allclose(out.frequencies, np.sqrt(exact) * vib.CM1, rtol=1e-10)
    assert 600 < out.frequencies[0] < 700 and 2000 < out.frequencies[-1] < 2600  # cm^-1, CO2-like
    # the model is exactly invariant, so without projection the 5 rigid modes are zeros
    full = vib.harmonic_analysis(np.array([8, 6, 8]), positions, hessian, project=False)
    assert np.allclose(full.eigenvalues[:5], 0.0, atol=1e-10) and np.allclose(full.eigenvalues[5:], exact)
    assert vib.hessian_eigenvalues(hessian, positions, project=True).shape == (4,)

    # the DFT minima of HCN and HNC (the smallest principal moment ~1e-7 amu A^2); their TS is bent
    hcn = [m for m in rtp if m.meta["reaction"] == "hcn_hnc"]
    for mol in hcn:
        out = vib.harmonic_analysis(mol.numbers, mol.positions, mol.hessian)
        linear = mol.meta["point"] != "ts"
        assert out.n_rigid == (5 if linear else 6) and len(out.frequencies) == (4 if linear else 3)
        if linear:
            assert np.isclose(out.frequencies[0], out.frequencies[1], atol=0.5)  # the degenerate bend

    # an atom has no vibration, a diatomic one: sqrt(k / mu)
    atom = vib.harmonic_analysis(np.array([8]), np.zeros((1, 3)), np.zeros((3, 3)))
    assert atom.n_rigid == 3 and atom.frequencies.shape == (0,) and atom.modes.shape == (0, 1, 3)
    u = np.array([[0.0, 0.0, 1.0]])
    block = k_bond * u.T @ u
    diatomic = vib.harmonic_analysis(
        np.array([6, 8]), np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 1.13]]), np.block([[block, -block], [-block, block]])
    )
    assert diatomic.frequencies.shape == (1,)
    assert np.isclose(diatomic.frequencies[0], np.sqrt(k_bond * (1 / m_o + 1 / m_c)) * vib.CM1, rtol=1e-12)
    # 1 / |M^-1/2 e|^2, the Gaussian/PySCF reduced mass: for a diatomic not m1 m2 / (m1 + m2) but
    assert np.isclose(diatomic.reduced_masses[0], m_o * m_c * (m_o + m_c) / (m_o**2 + m_c**2), rtol=1e-12)


# --- 4. and 5. ASE ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def emt_water(tmp_path_factory):
    """EMT water relaxed to fmax 1e-4 eV/A, and ASE's central-difference `VibrationsData` of it."""
    atoms = molecule("H2O")
    atoms.calc = EMT()
    assert BFGS(atoms, logfile=None).run(fmax=1e-4, steps=200)
    name = str(tmp_path_factory.mktemp("ase-vib") / "vib")  # ASE's displacement cache
    vibrations = Vibrations(atoms, name=name, delta=0.01, nfree=2)
    vibrations.run()
    return atoms, vibrations.get_vibrations()


def test_matches_ase_finite_difference_vibrations(emt_water):
    atoms, data = emt_water
    hessian = data.get_hessian_2d()  # [9, 9] eV/A^2, central differences of EMT forces
    masses = atoms.get_masses()
    freq_ase = data.get_frequencies()  # [9] complex cm^-1, no projection
    # without projection phljax is ASE's algorithm: all 3N frequencies, imaginary ones negative
    full = vib.harmonic_analysis(atoms.numbers, atoms.positions, hessian, project=False)
    ref = freq_ase.real - np.abs(freq_ase.imag)
    # compared as eigenvalues (signed f^2): a rigid-body mode's ~0.1 cm^-1 is sqrt of an eigenvalue
    # known only to eps * the largest one, so its frequency differs by ~1e-8 cm^-1 between BLAS builds
    ours_sq, ref_sq = np.sign(full.frequencies) * full.frequencies**2, np.sign(ref) * ref**2
    assert np.allclose(ours_sq, ref_sq, rtol=1e-10, atol=1e-12 * ref_sq.max())
    assert np.allclose(full.frequencies[-3:], ref[-3:], rtol=1e-10)  # the vibrations themselves, to 1e-10

    ours = vib.harmonic_analysis(atoms.numbers, atoms.positions, hessian)
    assert ours.n_rigid == 6 and ours.n_imaginary() == 0
    top = freq_ase[-3:]
    assert np.all(top.imag == 0) and top.real.min() > 100  # cm^-1: the real vibrations are the top three
    # Tolerance: in the basis (vibrations B, rigid Q) the mass-weighted Hessian is [[A, C], [C^T, D]];
    # phljax diagonalises A, ASE the whole matrix. When A's spectrum lies above D's by a gap eta, each
    # eigenvalue moves by at most |C|^2 / eta (quadratic residual bound, Li & Li, LAA 2005), and a
    # frequency by CM1^2 * that / (nu_ours + nu_ase). The finite differences and fmax 1e-4 make C small.
    p, _ = vib.rigid_body_projector(atoms.positions, masses)  # [9, 9], I - Q Q^T
    h_mw = vib.mass_weighted_hessian(hessian, masses)
    coupling = np.linalg.norm(p @ h_mw @ (np.eye(9) - p), 2)  # |C|, eV/A^2/amu
    gap = ours.eigenvalues.min() - max(np.linalg.eigvalsh((np.eye(9) - p) @ h_mw @ (np.eye(9) - p)).max(), 0.0)
    bound = vib.CM1**2 * coupling**2 / gap / (ours.frequencies + top.real)  # [3] cm^-1
    assert bound.max() < 0.05, bound  # the comparison is meaningful
    assert np.all(np.abs(ours.frequencies - top.real) <= bound + 1e-9), (ours.frequencies - top.real, bound)


def test_ase_bridges(emt_water, rtp):
    atoms, data = emt_water
    hessian = data.get_hessian_2d()
    ours = vib.harmonic_analysis(atoms.numbers, atoms.positions, hessian, masses=atoms.get_masses())

    raw = vib.to_vibrations_data(atoms, hessian.reshape(3, 3, 3, 3))
    assert np.allclose(raw.get_frequencies(), data.get_frequencies(), rtol=1e-12, atol=1e-10)
    projected = vib.to_vibrations_data(atoms, hessian, project=True).get_frequencies()  # [9] complex cm^-1
    assert np.allclose(projected[-3:].real, ours.frequencies, rtol=1e-10)
    assert np.abs(projected[:6]).max() < 1e-2  # the rigid-body modes are zeros up to rounding

    thermo = vib.ideal_gas_thermo(atoms, hessian)
    assert thermo.geometry == "nonlinear"
    enthalpy = thermo.get_enthalpy(298.15, verbose=False)  # eV
    assert np.isfinite(enthalpy)
    zpe = 0.5 * np.sum(ours.frequencies) * vib.INVCM  # eV
    assert np.isclose(thermo.get_ZPE_correction(), zpe, rtol=1e-12)
    assert np.isfinite(thermo.get_gibbs_energy(298.15, 101325.0, verbose=False))

    # geometry from the projection: linear HCN; a transition state's imaginary mode is refused unless ignored
    by_name = {(m.meta["reaction"], m.meta["point"]): m for m in rtp}
    hcn = by_name["hcn_hnc", "reactant"]
    hcn_atoms = Atoms(numbers=hcn.numbers, positions=hcn.positions)
    assert vib.ideal_gas_thermo(hcn_atoms, hcn.hessian).geometry == "linear"
    with pytest.raises(ValueError, match="contradicts the 5 rigid-body modes"):
        vib.ideal_gas_thermo(hcn_atoms, hcn.hessian, geometry="nonlinear")
    ts = by_name["hcn_hnc", "ts"]
    ts_atoms = Atoms(numbers=ts.numbers, positions=ts.positions)
    with pytest.raises(ValueError, match="Imaginary"):
        vib.ideal_gas_thermo(ts_atoms, ts.hessian)
    with pytest.warns(UserWarning, match="1 imag modes removed"):
        ts_thermo = vib.ideal_gas_thermo(ts_atoms, ts.hessian, ignore_imag_modes=True)
    assert ts_thermo.n_imag == 1 and np.isfinite(ts_thermo.get_enthalpy(298.15, verbose=False))


# --- Hessian eigenvalues ------------------------------------------------------------------------------------------


def test_hessian_eigenvalues(rtp):
    mol = rtp[2]  # CH3NC -> CH3CN transition state
    n = len(mol.numbers)
    h = mol.hessian.reshape(3 * n, 3 * n)
    assert np.allclose(vib.hessian_eigenvalues(mol.hessian), np.linalg.eigvalsh(h))
    cartesian = vib.hessian_eigenvalues(mol.hessian, mol.positions, project=True)  # eV/A^2
    assert cartesian.shape == (3 * n - 6,) and np.all(np.diff(cartesian) >= 0)
    assert vib.count_negative(mol.hessian, mol.positions) == 1
    masses = atomic_masses[mol.numbers]
    weighted = vib.hessian_eigenvalues(mol.hessian, mol.positions, masses, project=True)  # eV/A^2/amu
    assert np.allclose(weighted, vib.harmonic_analysis(mol.numbers, mol.positions, mol.hessian).eigenvalues)
    # the projected Cartesian eigenvalues interlace the raw ones (Cauchy): a restriction to a subspace
    raw = np.linalg.eigvalsh(h)
    assert np.all(cartesian >= raw[: 3 * n - 6] - 1e-9) and np.all(cartesian <= raw[6:] + 1e-9)


# --- 6. errors ----------------------------------------------------------------------------------------------------


def test_bad_inputs_raise_value_errors(rtp):
    mol = rtp[6]  # 4 atoms
    z, r, h = mol.numbers, mol.positions, mol.hessian  # [4], [4, 3], [4, 3, 4, 3]
    hcn = next(m for m in rtp if m.meta["reaction"] == "hcn_hnc")
    cases = [
        (lambda: vib.harmonic_analysis(z, r, np.zeros((12, 13))), "(12, 13)"),
        (lambda: vib.harmonic_analysis(z, r, np.zeros((10, 10))), "(10, 10)"),
        (lambda: vib.harmonic_analysis(z, r, np.zeros((4, 3, 4, 2))), "(4, 3, 4, 2)"),
        (lambda: vib.harmonic_analysis(z, r, np.zeros((9, 9))), "(9, 9)"),  # 3 atoms' Hessian for 4 atoms
        (lambda: vib.harmonic_analysis(z, r[:3], h), "(3, 3)"),
        (lambda: vib.harmonic_analysis(z, r.ravel(), h), "(12,)"),
        (lambda: vib.harmonic_analysis(z, r, h, masses=np.ones(3)), "(3,)"),
        (lambda: vib.harmonic_analysis(z, r, h, masses=-np.ones(4)), "positive"),
        (lambda: vib.harmonic_analysis(z.astype(float), r, h), "int"),
        (lambda: vib.harmonic_analysis(z, np.where(np.eye(4, 3) == 1, np.nan, r), h), "(4, 3)"),
        (lambda: vib.harmonic_analysis(z, r, np.where(np.eye(12) == 1, np.inf, h.reshape(12, 12))), "(12, 12)"),
        # for 3 atoms PySCF's [N, N, 3, 3] layout has the shape of [N, 3, N, 3], but it is not symmetric
        (lambda: vib.harmonic_analysis(hcn.numbers, hcn.positions, hcn.hessian.transpose(0, 2, 1, 3)), "not symmetric"),
        (lambda: vib.harmonic_analysis(z, r, h.transpose(0, 2, 1, 3)), "(4, 4, 3, 3)"),
        (lambda: vib.mass_weighted_hessian(h, np.ones(5)), "(4, 3, 4, 3)"),
        (lambda: vib.rigid_body_projector(r, np.ones(4), linear_tol=-1.0), "linear_tol"),
        (lambda: vib.rigid_body_projector(r[:, :2], np.ones(4)), "(4, 2)"),
        (lambda: vib.hessian_eigenvalues(h, project=True), "needs positions"),
        (lambda: vib.hessian_eigenvalues(h, r[:2], project=True), "(2, 3)"),
        (lambda: vib.count_negative(h, r, tol=np.nan), "tol"),
        (lambda: vib.to_vibrations_data(Atoms("H2", positions=np.eye(2, 3)), h), "2 atoms"),
        (lambda: vib.ideal_gas_thermo(Atoms(numbers=z, positions=r), h, geometry="bent"), "'bent'"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            call()
