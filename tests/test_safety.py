"""Finite derivatives to third order where a naive model produces NaN.

The HVP loss differentiates the energy three times (parameters over a Hessian-vector product).
Each geometry below sits in a padded batch with padding nodes and zero-length padding edges; the
model runs in float32, as it trains, with `jax_debug_nans` on, so any NaN raises with the
primitive that made it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import phljax
from phljax import data as phdata
from phljax.data import Molecule
from phljax.data.batching import BatchBudget
from phljax.models import build_model, init_params, make_energy_fn

CUTOFF = 3.0  # Angstrom, the model's cutoff
NEIGHBOURS = CUTOFF + 0.5  # a neighbour list with a skin: pairs at and beyond the cutoff are edges
BUDGET = BatchBudget(n_graphs=2, n_nodes=8, n_edges=16, max_atoms=3, with_hessian=True)

GEOMETRIES = {
    "padding": [[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]],
    "coincident atoms": [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.96, 0.1, 0.0]],
    "pair at the cutoff": [[0.0, 0.0, 0.0], [CUTOFF, 0.0, 0.0], [1.0, 0.8, 0.0]],
    "pair just inside the cutoff": [[0.0, 0.0, 0.0], [CUTOFF - 1e-5, 0.0, 0.0], [1.0, 0.8, 0.0]],
    "pair just beyond the cutoff": [[0.0, 0.0, 0.0], [CUTOFF + 1e-5, 0.0, 0.0], [1.0, 0.8, 0.0]],
}


def _batch(name):
    positions = np.array(GEOMETRIES[name])
    mol = Molecule(np.array([8, 1, 1]), positions, 0.0, np.zeros((3, 3)), np.zeros((3, 3, 3, 3)))
    batch = phdata.make_batch([mol], BUDGET, NEIGHBOURS, dtype=np.float32)
    padding = ~batch.edge_mask
    assert padding.any() and np.all(batch.senders[padding] == batch.receivers[padding])  # zero-length edges
    assert batch.edge_mask.sum() == 6  # every pair of the molecule is an edge, also the one at the cutoff
    return jax.tree.map(jnp.asarray, batch)


@pytest.fixture(scope="module")
def debug_nans():
    old = jax.config.jax_debug_nans
    jax.config.update("jax_debug_nans", True)
    yield
    jax.config.update("jax_debug_nans", old)


@pytest.fixture(scope="module")
def model(debug_nans):
    model = build_model(cutoff=CUTOFF, channels=4, lmax=1, num_layers=1)
    energy_fn = make_energy_fn(model)
    params = init_params(model, _batch("padding"), jax.random.PRNGKey(0))
    loss_fn = phljax.make_loss_fn(energy_fn, phljax.LossConfig(probe="random"))
    param_grad = jax.jit(jax.grad(loss_fn, has_aux=True))

    def total(params, r, batch):
        return energy_fn(params, batch._replace(positions=r)).sum()

    third = jax.jit(jax.jacfwd(jax.hessian(total, argnums=1), argnums=1))
    energy = jax.jit(energy_fn)
    return params, param_grad, third, energy


def _finite(tree):
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_hvp_loss_parameter_gradient_is_finite(model, name):
    params, param_grad, _, _ = model
    grads, (count, metrics) = param_grad(params, _batch(name), jax.random.PRNGKey(1))
    assert count == 1 and _finite(metrics) and metrics["hessian_loss"] > 0
    assert _finite(grads)
    assert sum(float(jnp.sum(g**2)) for g in jax.tree.leaves(grads)) > 0


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_third_position_derivative_is_finite(model, name):
    params, _, third, _ = model
    batch = _batch(name)
    d3 = np.asarray(third(params, batch.positions, batch))  # [N, 3, N, 3, N, 3]
    assert d3.shape == (8, 3) * 3
    assert np.all(np.isfinite(d3))
    assert np.abs(d3[:3, :, :3, :, :3]).max() > 0  # the real atoms' third derivative is not trivially zero
    assert np.all(d3[3:] == 0)  # padding nodes do not interact


def test_energy_is_continuous_at_the_cutoff(model):
    params, _, _, energy = model
    e = {name: float(energy(params, _batch(name))[0]) for name in GEOMETRIES if "cutoff" in name}
    at = e["pair at the cutoff"]
    # the envelope vanishes with its first two derivatives: a 1e-5 A step changes E by ~1e-15 eV
    assert abs(e["pair just inside the cutoff"] - at) < 1e-6
    assert abs(e["pair just beyond the cutoff"] - at) < 1e-6
