"""`phljax.Potential`: a trained run's model as energies, forces, Hessians and HVPs of molecules.

The derivatives are checked against each other by finite differences in float64 (energy -> forces
-> Hessian -> HVP), a repeated call on the same size bucket must not trace again, and a list of
molecules must give what each molecule gives alone.
"""

from __future__ import annotations

import dataclasses

import chex
import numpy as np
import pytest

import phljax
from phljax.evaluation import evaluate_molecules, evaluate_workdir, stationary_metrics


@pytest.fixture(scope="module")
def potential(trained):
    config, _, _, _ = trained
    return phljax.Potential.from_workdir(config.workdir)


def test_from_workdir_rebuilds_the_trained_model(potential, trained):
    config, _, _, _ = trained
    assert potential.config == config
    assert potential.elements == tuple(config.elements) and potential.cutoff == config.cutoff
    with pytest.raises(FileNotFoundError, match="config.json: not found"):
        phljax.Potential.from_workdir(str(config.workdir) + "-missing")


def test_forces_hessian_and_hvp_agree_with_finite_differences(potential, molecules):
    """float64: F = -dE/dR and H = -dF/dR by central differences; H v = hvp(v); H symmetric."""
    m = molecules[3]
    z, r = m.numbers, m.positions
    e, f = potential.energy_and_forces(z, r, dtype=np.float64)
    h = potential.hessian(z, r, dtype=np.float64)
    n = len(z)
    assert h.shape == (3 * n, 3 * n)
    chex.assert_trees_all_close(h, h.T, atol=1e-10)
    step = 1e-4
    fd_f = np.zeros(3 * n)
    fd_h = np.zeros((3 * n, 3 * n))
    for c in range(3 * n):
        d = np.zeros(3 * n)
        d[c] = step
        rp, rm = r + d.reshape(n, 3), r - d.reshape(n, 3)
        (ep, fp), (em, fm) = (potential.energy_and_forces(z, x, dtype=np.float64) for x in (rp, rm))
        fd_f[c] = -(ep - em) / (2 * step)
        fd_h[:, c] = -(fp - fm).ravel() / (2 * step)
    chex.assert_trees_all_close(f.ravel(), fd_f, atol=1e-6, rtol=1e-6)
    chex.assert_trees_all_close(h, fd_h, atol=1e-6, rtol=1e-5)
    v = np.random.default_rng(0).normal(size=(2, n, 3))
    hv = potential.hvp(z, r, v, dtype=np.float64)
    chex.assert_trees_all_close(hv.reshape(2, -1), v.reshape(2, -1) @ h, atol=1e-9)
    assert potential.hvp(z, r, v[0], dtype=np.float64).shape == (n, 3)


def test_same_bucket_never_recompiles(potential, molecules):
    """Repeated calls on one molecule, and on its distorted geometries (same size bucket: atoms
    and edges rounded up to powers of two), trace each program once."""
    water = molecules[:6]  # six H2O geometries
    z = water[0].numbers
    potential.hessian(z, water[0].positions)
    potential.energy_and_forces(z, water[0].positions)
    first = potential.compilations
    for m in water * 2:
        potential.hessian(z, m.positions)
        potential.energy_and_forces(z, m.positions)
    assert potential.compilations == first
    original = potential.energy_fn
    potential.energy_fn = chex.assert_max_traces(original, n=1)  # the model itself, traced once for a new program
    potential._jitted.clear()
    try:
        for m in water:
            potential.energy(z, m.positions)
    finally:
        potential.energy_fn = original
        potential._jitted.clear()
        chex.clear_trace_counter()


def test_a_list_gives_what_each_molecule_gives(potential, molecules):
    mols = molecules[:5]
    energies, forces = potential.energy_and_forces([m.numbers for m in mols], [m.positions for m in mols])
    hessians = potential.hessian([m.numbers for m in mols], [m.positions for m in mols])
    for m, e, f, h in zip(mols, energies, forces, hessians, strict=True):
        e1, f1 = potential.energy_and_forces(m.numbers, m.positions)
        chex.assert_trees_all_close((e, f), (e1, f1), rtol=1e-5, atol=1e-5)
        chex.assert_trees_all_close(h, potential.hessian(m.numbers, m.positions), rtol=1e-4, atol=1e-4)


def test_bad_molecules_are_refused(potential, molecules):
    m = molecules[0]
    with pytest.raises(ValueError, match=r"element\(s\) \[9\] not in the model's elements"):
        potential.energy(np.array([9, 1, 1]), m.positions)
    bad = m.positions.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="positions are not finite"):
        potential.forces(m.numbers, bad)
    with pytest.raises(ValueError, match=r"probes of shape \(2, 3\), expected \(3, 3\)"):
        potential.hvp(m.numbers, m.positions, np.zeros((2, 3)))


def test_evaluate_workdir_goes_through_the_potential(trained, h5_path):
    config, _, _, _ = trained
    errors = evaluate_workdir(config.workdir, [h5_path])
    (name,) = errors
    assert errors[name]["n_molecules"] == 24 and {"energy_rmse", "forces_rmse", "hessian_rmse"} <= set(errors[name])


def test_relative_energy_errors_are_blind_to_a_per_formula_offset(trained, molecules):
    """energy_rel_*: each formula's mean error removed (hand computation from the Potential's
    energies); shifting one formula's reference energies moves energy_rmse, not energy_rel_rmse."""
    config, _, _, _ = trained
    potential = phljax.Potential.from_workdir(config.workdir)
    errors = np.array(potential.energy([m.numbers for m in molecules], [m.positions for m in molecules]))
    errors -= [m.energy for m in molecules]
    formulas = [phljax.data.formula(m.numbers) for m in molecules]
    centred = errors.copy()
    for f in set(formulas):
        members = [i for i, g in enumerate(formulas) if g == f]
        centred[members] -= errors[members].mean()
    got = evaluate_molecules(potential, {"all": molecules})["all"]
    assert got["n_formulas"] == 4 and got["n_energy_rel"] == 24
    np.testing.assert_allclose(got["energy_rel_rmse"], np.sqrt(np.mean(centred**2)), rtol=1e-5)
    np.testing.assert_allclose(got["energy_rel_mae"], np.mean(np.abs(centred)), rtol=1e-5)
    np.testing.assert_allclose(got["energy_rmse"], np.sqrt(np.mean(errors**2)), rtol=1e-5)
    shifted = [
        dataclasses.replace(m, energy=m.energy + 3.0 * (f == formulas[0]))
        for m, f in zip(molecules, formulas, strict=True)
    ]
    moved = evaluate_molecules(potential, {"all": shifted})["all"]
    np.testing.assert_allclose(moved["energy_rel_rmse"], got["energy_rel_rmse"], rtol=1e-4)
    assert moved["energy_rmse"] > got["energy_rmse"] + 0.5


class _Exact:
    """A stand-in potential whose Hessians are the reference ones (by position)."""

    def __init__(self, molecules, scale=1.0):
        self.by_key = {m.positions.tobytes(): m.hessian.reshape(3 * m.n_atoms, -1) * scale for m in molecules}

    def hessian(self, numbers, positions, dtype=None):
        return [self.by_key[np.asarray(r, np.float64).tobytes()] for r in positions]


def test_stationary_metrics_of_the_reference_hessians_are_perfect():
    """DFT Hessians against themselves: zero errors, every minimum with 0 and every TS with 1
    imaginary frequency; scaling them by 1.21 scales every frequency by 1.1."""
    rtp = phljax.read_h5(phljax.data.bundled_path("chon_reactions-RTP.h5"))
    exact = stationary_metrics(_Exact(rtp), rtp)
    assert exact["n_stationary"] == len(rtp) and exact["n_ts"] == sum(m.meta["point"] == "ts" for m in rtp)
    assert exact["frequency_mae_cm1"] < 1e-6 and exact["hessian_eigenvalue_mae"] < 1e-9
    assert exact["stationary_index_correct"] == 1.0 and exact["ts_imaginary_frequency_mae_cm1"] < 1e-6
    scaled = stationary_metrics(_Exact(rtp, 1.21), rtp)
    freqs = np.concatenate([np.abs(phljax.vibrations.harmonic_analysis(m.numbers, m.positions, m.hessian).frequencies)
                            for m in rtp])  # fmt: skip
    assert scaled["frequency_mae_cm1"] == pytest.approx(0.1 * freqs.mean(), rel=1e-6)
    assert scaled["stationary_index_correct"] == 1.0
