"""Tests of phljax.datagen: unit tables, dispersion derivatives, Hessian checks, normal-mode sampling,
the measurement scripts and the one source of every default.

Everything PySCF does here is HF/STO-3G on H2O, so each test takes seconds on 2 cores.
"""

from __future__ import annotations

import numpy as np
import pytest
from script_loader import load_script

from phljax import units
from phljax.datagen.dft import HESSIAN_LIMITS, HessianCheckError, hessian_checks, validate_hessian
from phljax.datagen.dispersion import (
    C6_D2_JNM6,
    CHG_A,
    JNM6_PER_MOL_TO_HARTREE_BOHR6,
    R0_D2_ANGSTROM,
    chg_dispersion,
    chg_dispersion_energy,
)
from phljax.datagen.sampling import sample_normal_modes
from phljax.units import DFT_BOHR, DFT_KB

# A bent, non-symmetric C/H/N/O cluster in Bohr with pair distances from ~2 to ~9 Bohr, so the
# damping function is probed from strongly damped (r < R_r) to asymptotic (r >> R_r).
NUMBERS = np.array([6, 1, 7, 8, 1, 1])
POSITIONS = np.array(
    [
        [0.00, 0.00, 0.00],
        [2.05, 0.10, -0.20],
        [-1.10, 2.30, 0.35],
        [-0.90, -2.10, 1.70],
        [-3.00, 2.90, -1.10],
        [4.10, -3.50, 4.20],
    ]
)


def _fd_gradient(f, x, h=1e-4):
    g = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        g[idx] = (f(xp) - f(xm)) / (2 * h)
    return g


# ----------------------------------------------------------------------------- units


def test_dft_and_reader_unit_tables_agree():
    """The DFT side's CODATA 2018 constants and the reader side's ase (CODATA 2014) ones are two
    editions of the same quantities: equal to 1e-8, and the DFT side consistent in itself."""
    np.testing.assert_allclose(units.DFT_BOHR, units.BOHR, rtol=1e-8)
    np.testing.assert_allclose(units.DFT_HARTREE, units.HARTREE, rtol=1e-8)
    np.testing.assert_allclose(units.DFT_HARTREE_KCAL_MOL, units.HARTREE / units.KCAL_MOL, rtol=1e-8)
    np.testing.assert_allclose(units.DFT_HARTREE_KJ_MOL, units.HARTREE / units.KJ_MOL, rtol=1e-8)
    np.testing.assert_allclose(units.DFT_HARTREE_KJ_MOL, 4.184 * units.DFT_HARTREE_KCAL_MOL, rtol=1e-12)
    from ase.units import kB  # eV/K

    np.testing.assert_allclose(units.DFT_KB * units.DFT_HARTREE, kB, rtol=1e-6)
    assert units.DFT_BOHR != units.BOHR  # two sets on purpose (see phljax/units.py): neither may move


# ----------------------------------------------------------------------------- dispersion


def test_d2_constants_match_psi4_tables():
    """C6 (Hartree Bohr^6) and radii (Bohr) agree with Psi4's -D2/-CHG tables (dispersion_defines.h)."""
    psi4_c6 = {1: 2.4283353778422600, 6: 30.354192223028200, 7: 21.334660819614100, 8: 12.141676889211300}
    psi4_rvdw = {1: 1.89161571498900, 6: 2.74388213602800, 7: 2.63994720663300, 8: 2.53601227723800}
    for z in (1, 6, 7, 8):
        np.testing.assert_allclose(C6_D2_JNM6[z] * JNM6_PER_MOL_TO_HARTREE_BOHR6, psi4_c6[z], rtol=2e-6)
        np.testing.assert_allclose(R0_D2_ANGSTROM[z] / DFT_BOHR, psi4_rvdw[z], rtol=2e-6)


def test_pair_energy_closed_form():
    """At r = R_r the damping is 1/(1+a); far away E -> -C6/r^6."""
    c6_oo = C6_D2_JNM6[8] * JNM6_PER_MOL_TO_HARTREE_BOHR6
    rr = 2 * R0_D2_ANGSTROM[8] / DFT_BOHR
    pos = np.array([[0.0, 0.0, 0.0], [rr, 0.0, 0.0]])
    e = chg_dispersion_energy(np.array([8, 8]), pos)
    np.testing.assert_allclose(e, -c6_oo / rr**6 / (1 + CHG_A), rtol=1e-12)
    far = 60.0
    e_far = chg_dispersion_energy(np.array([8, 8]), np.array([[0.0, 0, 0], [0, 0, far]]))
    np.testing.assert_allclose(e_far, -c6_oo / far**6, rtol=1e-8)
    # Short range: the CHG damping makes the pair term vanish as r^6 instead of diverging.
    e_short = [chg_dispersion_energy(np.array([8, 8]), np.array([[0.0, 0, 0], [0, 0, r]])) for r in (0.5, 0.25)]
    np.testing.assert_allclose(e_short[0] / e_short[1], 2.0**6, rtol=1e-6)
    assert abs(e_short[0]) < 1e-5 * abs(e)


def test_dispersion_gradient_matches_finite_differences():
    e, g, _ = chg_dispersion(NUMBERS, POSITIONS)
    assert e < 0
    np.testing.assert_allclose(e, chg_dispersion_energy(NUMBERS, POSITIONS), rtol=1e-14)
    g_fd = _fd_gradient(lambda x: chg_dispersion_energy(NUMBERS, x), POSITIONS, h=1e-4)
    np.testing.assert_allclose(g, g_fd, rtol=1e-6, atol=1e-11)
    assert np.abs(g).max() > 1e-5  # not trivially zero


def test_dispersion_hessian_matches_finite_differences():
    _, _, hess = chg_dispersion(NUMBERS, POSITIONS)
    n = len(NUMBERS)
    h_fd = np.zeros((n, 3, n, 3))
    step = 1e-4
    for j in range(n):
        for b in range(3):
            xp, xm = POSITIONS.copy(), POSITIONS.copy()
            xp[j, b] += step
            xm[j, b] -= step
            h_fd[:, :, j, b] = (chg_dispersion(NUMBERS, xp)[1] - chg_dispersion(NUMBERS, xm)[1]) / (2 * step)
    np.testing.assert_allclose(hess, h_fd, rtol=1e-6, atol=1e-11)
    assert np.abs(hess).max() > 1e-5


def test_dispersion_hessian_sum_rules_and_invariance():
    e, g, hess = chg_dispersion(NUMBERS, POSITIONS)
    n = len(NUMBERS)
    flat = hess.reshape(3 * n, 3 * n)
    np.testing.assert_allclose(flat, flat.T, rtol=0, atol=1e-15)
    np.testing.assert_allclose(hess.sum(axis=2), 0.0, atol=1e-14)  # translational sum rule
    np.testing.assert_allclose(g.sum(axis=0), 0.0, atol=1e-15)  # no net force
    # Rigid motion: energy invariant, gradient rotates, Hessian transforms as R H R^T.
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    moved = POSITIONS @ q.T + np.array([0.3, -1.2, 2.0])
    e2, g2, h2 = chg_dispersion(NUMBERS, moved)
    np.testing.assert_allclose(e2, e, rtol=1e-12)
    np.testing.assert_allclose(g2, g @ q.T, atol=1e-14)
    np.testing.assert_allclose(h2, np.einsum("ba,iajc,dc->ibjd", q, hess, q), atol=1e-14)


def test_dispersion_rejects_bad_input():
    with pytest.raises(ValueError, match="atomic numbers"):
        chg_dispersion(np.array([1, 16]), np.zeros((2, 3)) + [[0, 0, 0], [0, 0, 3]])
    with pytest.raises(ValueError, match="coincident"):
        chg_dispersion(np.array([1, 1]), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="shape|expected"):
        chg_dispersion(np.array([1, 1]), np.zeros((3, 3)))


# ----------------------------------------------------------------------------- Hessian checks


def test_validate_hessian_accepts_a_physical_hessian():
    _, _, hess = chg_dispersion(NUMBERS, POSITIONS)
    checks = validate_hessian(hess)
    assert checks["asym_rel"] < 1e-14 and checks["sum_rule_rel"] < 1e-12


def test_validate_hessian_rejects_asymmetric_hessian():
    _, _, hess = chg_dispersion(NUMBERS, POSITIONS)
    bad = hess.copy()
    # Break symmetry but keep the translational sum rule: add and subtract in the same row.
    eps = 1e-2 * np.abs(hess).max()
    bad[0, 0, 1, 1] += eps
    bad[0, 0, 2, 1] -= eps
    assert hessian_checks(bad)["sum_rule_rel"] < 1e-12
    with pytest.raises(HessianCheckError, match="symmetric"):
        validate_hessian(bad)


def test_validate_hessian_rejects_sum_rule_violation():
    _, _, hess = chg_dispersion(NUMBERS, POSITIONS)
    bad = hess.copy()
    # A symmetric error on the diagonal blocks breaks only the translational sum rule.
    bad[1, 2, 1, 2] += 0.05 * np.abs(hess).max()
    assert hessian_checks(bad)["asym_rel"] == 0.0
    with pytest.raises(HessianCheckError, match="sum rule"):
        validate_hessian(bad, max_sum_rule_rel=1e-2)
    with pytest.raises(HessianCheckError, match="non-finite"):
        validate_hessian(np.full_like(hess, np.nan))


def test_hessian_checks_accepts_flat_layout_and_rejects_bad_shape():
    _, _, hess = chg_dispersion(NUMBERS, POSITIONS)
    n = len(NUMBERS)
    assert hessian_checks(hess.reshape(3 * n, 3 * n)) == hessian_checks(hess)
    with pytest.raises(ValueError):
        hessian_checks(np.zeros((4, 5)))


# ----------------------------------------------------------------------------- PySCF (HF/STO-3G)

# HF/STO-3G water near its minimum (Angstrom): r(OH) = 0.989, angle(HOH) = 100.0 deg.
_H2O_NUMBERS = np.array([8, 1, 1])
_ang = np.deg2rad(100.0) / 2
_H2O_POS = np.array(
    [
        [0.0, 0.0, 0.0],
        [0.0, 0.989 * np.sin(_ang), 0.989 * np.cos(_ang)],
        [0.0, -0.989 * np.sin(_ang), 0.989 * np.cos(_ang)],
    ]
)


def _cheap_level():
    from phljax.datagen.dft import LevelOfTheory

    # xc='hf' turns RKS into Hartree-Fock; grid_level is irrelevant then.
    return LevelOfTheory(xc="hf", basis="sto-3g", grid_level=0, conv_tol=1e-11, dispersion=True)


@pytest.fixture(scope="module")
def h2o_label():
    pytest.importorskip("pyscf")
    from phljax.datagen.dft import label_geometry

    return label_geometry(_H2O_NUMBERS, _H2O_POS, _cheap_level())


def test_label_geometry_parts_and_layout(h2o_label):
    """Total = DFT + dispersion; the Hessian's [N,3,N,3] layout matches FD of the gradient."""
    from phljax.datagen.dft import label_geometry

    out = h2o_label
    np.testing.assert_allclose(out["energy"], out["energy_dft"] + out["energy_disp"], rtol=1e-14)
    np.testing.assert_allclose(out["gradient"], out["gradient_dft"] + out["gradient_disp"], atol=1e-14)
    np.testing.assert_allclose(out["hessian"], out["hessian_dft"] + out["hessian_disp"], atol=1e-14)
    assert out["hessian"].shape == (3, 3, 3, 3)
    checks = validate_hessian(out["hessian"])
    assert checks["sum_rule_rel"] < 1e-5  # HF has no grid: the sum rule is exact up to CPHF
    # One column of the Hessian by central differences of the analytic gradient (H atom 1, y).
    step_ang = 1e-3
    cols = []
    for sgn in (1, -1):
        pos = _H2O_POS.copy()
        pos[1, 1] += sgn * step_ang
        cols.append(label_geometry(_H2O_NUMBERS, pos, _cheap_level(), hessian=False)["gradient"])
    col_fd = (cols[0] - cols[1]) / (2 * step_ang / DFT_BOHR)  # Hartree/Bohr^2
    np.testing.assert_allclose(out["hessian"][:, :, 1, 1], col_fd, atol=2e-5)
    assert np.abs(col_fd).max() > 0.1


def test_normal_mode_sampling_h2o(h2o_label):
    from phljax.datagen.sampling import normal_modes

    out = h2o_label
    nm = normal_modes(_H2O_NUMBERS, _H2O_POS, out["hessian"])
    assert nm["modes"].shape == (3, 3, 3)
    # HF/STO-3G water: bend ~2170, stretches ~4140 and ~4391 cm^-1.
    assert np.all(nm["freq_cm"] > 1500) and np.all(nm["freq_cm"] < 4700)
    temperature = 500.0
    rng = np.random.default_rng(0)
    samples, e_harm = sample_normal_modes(_H2O_POS, nm["modes"], nm["omega2"], nm["freq_cm"], 4000, temperature, rng)
    assert samples.shape == (4000, 3, 3)
    # Each of the 3 modes carries k_B T / 2 on average.
    kt = DFT_KB * temperature
    np.testing.assert_allclose(e_harm.mean(), 1.5 * kt, rtol=0.06)
    disp = samples - _H2O_POS[None]
    rms = np.sqrt((disp**2).sum(-1).mean())
    assert 0.01 < rms < 0.1, rms  # thermal displacements of a few hundredths of an Angstrom
    assert np.abs(disp).max() < 0.5
    # Pure vibrations: the centre of mass does not move.
    from ase.data import atomic_masses

    m = atomic_masses[_H2O_NUMBERS]
    np.testing.assert_allclose(np.einsum("i,sia->sa", m, disp), 0.0, atol=1e-10)
    # Deterministic from the seed.
    again, _ = sample_normal_modes(
        _H2O_POS, nm["modes"], nm["omega2"], nm["freq_cm"], 4000, temperature, np.random.default_rng(0)
    )
    np.testing.assert_array_equal(samples, again)


def test_sample_normal_modes_rejects_no_modes():
    with pytest.raises(ValueError, match="no vibrational mode"):
        sample_normal_modes(np.zeros((2, 3)), np.ones((1, 2, 3)), np.array([1e-8]), np.array([10.0]), 5)


def test_rectilinear_stretch_of_a_turn_and_a_stretch():
    """A straight step perpendicular to a bond (a turn) lengthens it at second order, exactly
    sqrt(1 + (2a/d0)^2) - 1 for both signs; a step along the bond changes it only at first order."""
    from phljax.datagen.sampling import rectilinear_stretch

    d0, s = 0.74, 0.3  # Angstrom; s: RMS amplitude in Bohr amu^1/2 (modes in amu^-1/2)
    pos = np.array([[0.0, 0.0, 0.0], [d0, 0.0, 0.0]])
    turn = np.array([[0.0, -1.0, 0.0], [0.0, 1.0, 0.0]]) / np.sqrt(2)
    stretch = np.array([[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]) / np.sqrt(2)
    omega2 = np.full(3, DFT_KB * 500.0 / s**2)  # so that sigma = s at 500 K
    omega2[2] = -1.0  # imaginary: not measured
    out = rectilinear_stretch([1, 1], pos, np.stack([turn, stretch, turn]), omega2, 500.0)
    a = s * DFT_BOHR / np.sqrt(2)
    np.testing.assert_allclose(out, [np.sqrt(1 + (2 * a / d0) ** 2) - 1, 0.0, 0.0], atol=1e-12)


def test_rotation_like_modes_of_a_weak_complex_are_frozen():
    """CO2...H2 (the bundled hcooh_co2_h2 product): straight steps along its H2 librations broke
    H-H in 19 of 20 samples at 500 K. Those modes are found, and without them no bond stretches
    by more than 25%; the reactant (formic acid) keeps every mode."""
    from phljax.data import bundled_path, read_h5
    from phljax.datagen.sampling import bonded_pairs, normal_modes, rectilinear_stretch

    mols = {m.meta["point"]: m for m in read_h5(bundled_path("chon_reactions-RTP.h5"))
            if m.meta["reaction"] == "hcooh_co2_h2"}  # fmt: skip
    for point, n_frozen in (("product", 3), ("reactant", 0)):
        m = mols[point]
        h = m.hessian * units.BOHR**2 / units.HARTREE  # Hartree/Bohr^2
        nm = normal_modes(m.numbers, m.positions, h)
        stretch = rectilinear_stretch(m.numbers, m.positions, nm["modes"], nm["omega2"], 500.0)
        frozen = stretch > 0.04
        assert frozen.sum() == n_frozen, (point, nm["freq_cm"], stretch)
        assert stretch[~frozen].max() < 0.03  # a clear gap to the rotation-like modes
        rng = np.random.default_rng(0)
        samples, _ = sample_normal_modes(m.positions, nm["modes"], nm["omega2"], nm["freq_cm"], 500, 500.0, rng,
                                         frozen=frozen)  # fmt: skip
        i, j = bonded_pairs(m.numbers, m.positions)
        d0 = np.linalg.norm(m.positions[i] - m.positions[j], axis=-1)
        d = np.linalg.norm(samples[:, i] - samples[:, j], axis=-1)
        assert np.abs(d / d0 - 1).max() < 0.25, point


def test_derivative_check_scripts_at_a_cheap_level():
    """label_cost.py and check_derivatives.py measure what their tables say (HF/STO-3G, seconds)."""
    from phljax.datagen.dft import LevelOfTheory

    level = LevelOfTheory(xc="hf", basis="sto-3g", grid_level=0, conv_tol=1e-11, dispersion=False)
    cost = load_script("experiments", "label_cost").measure("H2O", level, num_probes=2, step=5e-3, seed=0)
    assert cost["n_atoms"] == 3 and cost["hessian_s"] > 0 and cost["hvp_s"] > 0
    assert cost["fd_rel_error"] < 1e-4  # HF: analytic Hessian and gradients are consistent
    cd = load_script("experiments", "check_derivatives")
    scan = cd.step_scan("H2O", level, num_probes=2, steps=[2e-3, 2e-2], seed=0)
    assert scan["fd_rel_error"][0] < scan["fd_rel_error"][1]  # O(h^2) truncation shows at 2e-2
    grads = cd.gradient_check("H2O", level, seed=0)
    # central differences at h = 2e-3 A leave O(h^2) ~ 2e-6 Eh/a0 of truncation
    assert grads["error_default"] < 1e-5 and grads["max_abs_gradient"] > 1e-3  # off the minimum


# ----------------------------------------------------------------------------- defaults


def test_make_dataset_without_flags_asks_for_the_default_configuration():
    """Every default of make_dataset.py is the ReactionConfig's (so a run without flags resumes the
    bundled cache), and every labelling function checks Hessians with the same limits."""
    import inspect

    from phljax.datagen import labels
    from phljax.datagen.reactions.spec import ACCEPTANCE, ReactionConfig

    script = load_script("experiments", "make_dataset")
    assert script.config(script.parse_args([])) == ReactionConfig()
    assert set(ACCEPTANCE) == {"max_asym_rel", "max_sum_rule_rel"}
    for fn in (validate_hessian, labels.label_hessian):
        params = inspect.signature(fn).parameters
        for name in ACCEPTANCE:
            assert params[name].default == getattr(HESSIAN_LIMITS, name) == getattr(ReactionConfig(), name), fn
    with pytest.raises(SystemExit):  # probe kinds are the ones make_probes draws
        script.parse_args(["--probe-kind", "uniform"])


def test_probe_kinds_are_ones_training_knows():
    """HVP labels drawn with a datagen probe kind can be trained with the same kind of probe."""
    from phljax.datagen.labels import PROBE_KINDS, make_probes
    from phljax.probes import DISTRIBUTIONS

    assert set(PROBE_KINDS) <= set(DISTRIBUTIONS)
    for kind in PROBE_KINDS:
        v = make_probes(kind, 2000, 2, np.random.default_rng(0)).reshape(2000, 6)
        np.testing.assert_allclose(v.T @ v / 2000, np.eye(6), atol=0.2)  # E[v v^T] = I, as phljax.probes'
    with pytest.raises(ValueError, match="unknown probe kind"):
        make_probes("uniform", 1, 2, np.random.default_rng(0))
