"""E(3) and permutation symmetry of the NequIP model: energies, forces and Hessians, in float64."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from phljax.data import Molecule


def _rotation(seed: int) -> np.ndarray:
    return Rotation.random(random_state=seed).as_matrix()


def _transformed(mol: Molecule, rotation: np.ndarray, shift: np.ndarray) -> Molecule:
    return Molecule(
        mol.numbers,
        mol.positions @ rotation.T + shift,
        mol.energy,
        mol.forces @ rotation.T,
        np.einsum("ik,nkml,jl->nimj", rotation, mol.hessian, rotation),
    )


def _single(model64, mol):
    """energy [], forces [n, 3], Hessian [n, 3, n, 3] of one molecule alone in a padded batch."""
    out = model64.derivs(model64.batch([mol]))
    n = mol.n_atoms
    return float(out["energy"][0]), np.asarray(out["forces"][:n]), np.asarray(out["hessian"][:n, :, :n, :])


TRANSFORMS = {
    "rotation": (_rotation(1), np.zeros(3)),
    "rotation+translation": (_rotation(2), np.array([0.7, -1.3, 2.1])),
    "reflection": (np.diag([-1.0, 1.0, 1.0]), np.zeros(3)),
    "inversion+rotation": (-_rotation(3), np.array([0.2, 0.1, -0.4])),
    "translation": (np.eye(3), np.array([3.0, -4.0, 5.0])),
}


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_energy_invariant_forces_and_hessian_covariant(model64, molecules, x64, name):
    rotation, shift = TRANSFORMS[name]
    mol = molecules[14]  # a distorted CH4: no symmetry of its own
    e, f, h = _single(model64, mol)
    e2, f2, h2 = _single(model64, _transformed(mol, rotation, shift))
    assert np.abs(f).max() > 1e-3 and np.abs(h).max() > 1e-2, "a vanishing model would pass trivially"
    np.testing.assert_allclose(e2, e, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(f2, f @ rotation.T, atol=1e-11)  # F(RX + t) = R F(X)
    np.testing.assert_allclose(h2, np.einsum("ik,nkml,jl->nimj", rotation, h, rotation), atol=1e-10)  # R H R^T


def test_atom_permutation(model64, molecules, x64):
    mol = molecules[20]  # a distorted H2CO: C, O, H, H
    perm = np.array([2, 0, 3, 1])
    e, f, h = _single(model64, mol)
    permuted = Molecule(
        mol.numbers[perm], mol.positions[perm], mol.energy, mol.forces[perm], mol.hessian[perm][:, :, perm]
    )
    e2, f2, h2 = _single(model64, permuted)
    np.testing.assert_allclose(e2, e, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(f2, f[perm], atol=1e-11)
    np.testing.assert_allclose(h2, h[perm][:, :, perm], atol=1e-10)
