"""Probes and PHL losses: E[v v^T] = I, the Hutchinson identity, probe keying, reference HVPs.

Statistical checks draw many probes with a fixed seed and compare a Monte Carlo mean with its
expectation within 5 standard errors; each also asserts that the standard error is small enough
for the comparison to catch a wrongly scaled probe (E[v v^T] = c I with c != 1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import phljax
from phljax.losses import LossConfig, step_probe_key
from phljax.probes import DISTRIBUTIONS, molecule_probes

N_SAMPLES = 20_000


def _block(x, batch, g):
    """Molecule g's rows of a node array [..., N, 3] flattened to [..., 3n]."""
    n = int(batch.n_atoms[g])
    nodes = np.asarray(batch.graph_nodes[g, :n])
    x = np.asarray(x)[..., nodes, :]
    return x.reshape(*x.shape[:-2], 3 * n)


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_second_moment_is_identity_on_real_atoms_zero_on_padding(model64, molecules, x64, distribution):
    batch = model64.batch([molecules[0], molecules[12]])  # 3 and 5 atoms, then padding
    v = np.asarray(phljax.batch_probes(jax.random.PRNGKey(0), distribution, N_SAMPLES, batch))  # [M, N, 3]
    assert v.shape == (N_SAMPLES, *batch.positions.shape) and v.dtype == np.float64
    assert np.all(v[:, ~np.asarray(batch.node_mask)] == 0)
    for g in range(2):
        x = _block(v, batch, g)  # [M, D]
        d = x.shape[1]
        products = x[:, :, None] * x[:, None, :]  # [M, D, D]
        mean = products.mean(0)
        se = products.std(0, ddof=1) / np.sqrt(N_SAMPLES)
        assert np.all(np.abs(mean - np.eye(d)) <= 5 * se + 1e-12), np.abs(mean - np.eye(d)).max()
        assert se.max() < 0.05, "too few samples to tell E[v v^T] = I from a rescaled identity"
        if distribution == "rademacher":
            assert np.all(np.abs(x) == 1)
        if distribution == "onehot":  # one coordinate of the molecule, scaled by sqrt(3N)
            assert np.all(np.count_nonzero(x, axis=1) == 1)
            np.testing.assert_allclose(np.abs(x).max(1), np.sqrt(d), rtol=1e-15)


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_molecule_probes_zero_beyond_the_atoms(distribution):
    v = molecule_probes(jax.random.PRNGKey(1), distribution, 64, jnp.int32(3), 5)
    assert v.shape == (64, 5, 3)
    assert np.all(np.asarray(v)[:, 3:] == 0) and np.any(np.asarray(v)[:, :3] != 0)
    with pytest.raises(ValueError, match="unknown probe distribution"):
        molecule_probes(jax.random.PRNGKey(1), "uniform", 1, jnp.int32(3), 5)


@pytest.fixture(scope="module")
def curvature_batch(model64, molecules):
    """A 3-molecule batch with Morse reference Hessians and the model's own Hessian blocks."""
    with jax.enable_x64(True):
        batch = model64.batch([molecules[i] for i in (4, 16, 21)])  # H2O, CH4, H2CO
        blocks = jnp.asarray(model64.derivs(batch)["blocks"])  # [N, 3, A, 3]
    return batch, blocks


def _dense(blocks, batch):
    """The block-diagonal batch Hessian [3N, 3N] from local-column blocks [N, 3, A, 3]."""
    n_nodes = batch.positions.shape[0]
    h = np.zeros((n_nodes, 3, n_nodes, 3))
    for g in range(int(batch.graph_mask.sum())):
        n = int(batch.n_atoms[g])
        nodes = np.asarray(batch.graph_nodes[g, :n])
        h[np.ix_(nodes, range(3), nodes, range(3))] = np.asarray(blocks)[nodes][:, :, :n]
    return h.reshape(3 * n_nodes, 3 * n_nodes)


def test_reference_hvp_equals_dense_hessian_times_v(curvature_batch, molecules, x64):
    batch, _ = curvature_batch
    h = _dense(batch.hessian, batch)
    for g, i in enumerate((4, 16, 21)):  # the dense matrix holds each molecule's own Hessian
        n = molecules[i].n_atoms
        nodes = np.asarray(batch.graph_nodes[g, :n])
        block = h.reshape(*batch.positions.shape, *batch.positions.shape)[nodes][:, :, nodes]
        np.testing.assert_array_equal(block, molecules[i].hessian)
    v = jax.random.normal(jax.random.PRNGKey(2), (3, *batch.positions.shape), jnp.float64)  # padding too
    hv = phljax.reference_hvp(batch, v)
    assert hv.shape == v.shape
    np.testing.assert_allclose(
        np.asarray(hv).reshape(3, -1), np.asarray(v).reshape(3, -1) @ h.T, rtol=1e-12, atol=1e-12
    )


def test_hessian_loss_is_the_normalised_frobenius_error(curvature_batch, x64):
    batch, blocks = curvature_batch
    loss = np.asarray(phljax.hessian_loss(blocks, batch))
    diff = _dense(blocks, batch) - _dense(batch.hessian, batch)
    for g in range(3):
        n = int(batch.n_atoms[g])
        nodes = np.asarray(batch.graph_nodes[g, :n])
        cols = (3 * nodes[:, None] + np.arange(3)).ravel()
        expected = np.sum(diff[np.ix_(cols, cols)] ** 2) / (3 * n) ** 2
        np.testing.assert_allclose(loss[g], expected, rtol=1e-12)
        assert expected > 1e-3  # the untrained model's Hessian is far from the reference
    assert loss[3] == 0  # the padding graph


def _per_probe_losses(batch, blocks, keys, distribution):
    """hvp_loss of each probe separately: [M, G]."""
    model = batch._replace(hessian=blocks)

    def one(key):
        v = phljax.batch_probes(key, distribution, 1, batch)
        return phljax.hvp_loss(phljax.reference_hvp(model, v), phljax.reference_hvp(batch, v), batch)

    return jax.jit(jax.vmap(one))(keys)


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_hutchinson_mean_of_hvp_losses_is_the_hessian_loss(curvature_batch, x64, distribution):
    batch, blocks = curvature_batch
    full = np.asarray(phljax.hessian_loss(blocks, batch))
    samples = np.asarray(
        _per_probe_losses(batch, blocks, jax.random.split(jax.random.PRNGKey(3), N_SAMPLES), distribution)
    )
    mean = samples.mean(0)
    se = samples.std(0, ddof=1) / np.sqrt(N_SAMPLES)
    for g in range(3):
        assert abs(mean[g] - full[g]) <= 5 * se[g], (g, mean[g], full[g], se[g])
        assert se[g] < 0.03 * full[g], "too few samples to tell an unbiased estimate from a biased one"
    assert np.all(samples[:, 3] == 0)


def test_onehot_over_every_column_is_exactly_the_hessian_loss(curvature_batch, x64):
    batch, blocks = curvature_batch
    full = np.asarray(phljax.hessian_loss(blocks, batch))
    model = batch._replace(hessian=blocks)
    for g in range(3):
        n = int(batch.n_atoms[g])
        nodes = np.asarray(batch.graph_nodes[g, :n])
        d = 3 * n
        v = np.zeros((d, *batch.positions.shape))
        for c in range(d):
            v[c, nodes[c // 3], c % 3] = np.sqrt(d)
        v = jnp.asarray(v)
        loss = phljax.hvp_loss(phljax.reference_hvp(model, v), phljax.reference_hvp(batch, v), batch)
        np.testing.assert_allclose(loss[g], full[g], rtol=1e-12)


def test_fixed_probes_follow_the_molecule_not_the_batch(model64, molecules, x64):
    a, b, c = molecules[6], molecules[18], molecules[13]  # NH3 and H2CO: 4 atoms each; CH4
    key = jax.random.PRNGKey(4)
    batch1 = model64.batch([a, b, c], indices=[10, 11, 12])
    batch2 = model64.batch([c, a], indices=[12, 10])
    for distribution in DISTRIBUTIONS:
        v1 = np.asarray(phljax.batch_probes(key, distribution, 2, batch1))
        v2 = np.asarray(phljax.batch_probes(key, distribution, 2, batch2))
        np.testing.assert_array_equal(_block(v1, batch1, 0), _block(v2, batch2, 1))  # molecule 10
        np.testing.assert_array_equal(_block(v1, batch1, 2), _block(v2, batch2, 0))  # molecule 12
        assert not np.array_equal(_block(v1, batch1, 0), _block(v1, batch1, 1))  # 10 and 11: same size
        assert not np.array_equal(_block(v1, batch1, 0)[0], _block(v1, batch1, 0)[1])  # two probes


def test_probe_keys_fixed_or_randomized_over_steps(model64, molecules, x64):
    batch = model64.batch([molecules[1], molecules[7]], indices=[1, 7])
    seed = jax.random.PRNGKey(5)

    def probes(step, mode):
        key = step_probe_key(seed, jnp.int32(step), LossConfig(probe="random", probe_mode=mode))
        return np.asarray(phljax.batch_probes(key, "gaussian", 1, batch))

    np.testing.assert_array_equal(probes(0, "fixed"), probes(7, "fixed"))
    np.testing.assert_array_equal(probes(3, "randomized"), probes(3, "randomized"))  # reproducible
    assert not np.any(probes(0, "randomized")[:, :7] == probes(1, "randomized")[:, :7])  # fresh every step


# -- the loss function of the training step ------------------------------------------------------------


@pytest.mark.parametrize("probe, mode", [("random", "randomized"), ("full", "randomized"), ("random", "data")])
def test_loss_fn_terms(model64, curvature_batch, x64, probe, mode):
    """make_loss_fn's sums equal the per-graph formulas, with the paper's weights (1, 0.30, 0.09).

    In 'data' mode the batch carries stored probes (3 of them; 2 are used) and their reference
    H v, and no probe is drawn: the curvature term must be that of the stored probes.
    """
    batch, blocks = curvature_batch
    config = LossConfig(probe=probe, num_probes=2, probe_mode=mode)
    key = jax.random.PRNGKey(6)
    v = phljax.batch_probes(key, config.distribution, 2, batch)
    if mode == "data":
        stored = phljax.batch_probes(jax.random.PRNGKey(7), "gaussian", 3, batch)
        batch = batch._replace(hvp_probes=stored, hvps=phljax.reference_hvp(batch, stored))
        batch = batch._replace(hessian=jnp.zeros_like(batch.hessian))  # not read in data mode
        v = stored[:2]
    loss, (count, metrics) = jax.jit(phljax.make_loss_fn(model64.energy_fn, config))(model64.params, batch, key)
    assert count == 3

    reference = curvature_batch[0]  # the same molecules, with the Morse Hessians
    out = model64.derivs(reference)
    n = np.asarray(batch.n_atoms[:3], float)
    le = (out["energy"][:3] - np.asarray(batch.energy[:3])) ** 2 / np.sqrt(n)
    df = (out["forces"] - np.asarray(batch.forces)) ** 2
    lf = np.array([df[np.asarray(batch.node_graph) == g].sum() for g in range(3)]) / (3 * n)
    if probe == "full":
        lh = np.asarray(phljax.hessian_loss(blocks, reference))[:3]
    else:
        model_hv = phljax.reference_hvp(reference._replace(hessian=blocks), v)
        lh = np.asarray(phljax.hvp_loss(model_hv, phljax.reference_hvp(reference, v), reference))[:3]
        assert lh.min() > 0
    np.testing.assert_allclose(metrics["energy_loss"], le.sum(), rtol=1e-10)
    np.testing.assert_allclose(metrics["force_loss"], lf.sum(), rtol=1e-10)
    np.testing.assert_allclose(metrics["hessian_loss"], lh.sum(), rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(loss, np.sum(le + 0.30 * lf + 0.09 * lh), rtol=1e-10)


# -- orthogonal probes and the variance of the trace estimate ----------------------------------------


def test_orthogonal_probes_are_orthogonal_blocks_on_the_real_atoms(model64, molecules, x64):
    batch = model64.batch([molecules[0], molecules[12]])  # 3 and 5 atoms (D = 9, 15), then padding
    k = 20  # one full block and a partial one for D = 15; two full blocks and a partial one for D = 9
    v = np.asarray(phljax.batch_probes(jax.random.PRNGKey(8), "orthogonal", k, batch))
    assert np.all(v[:, ~np.asarray(batch.node_mask)] == 0)
    for g in range(2):
        x = _block(v, batch, g)  # [K, D]
        d = x.shape[1]
        np.testing.assert_allclose(np.sum(x**2, axis=1), d, rtol=1e-12)  # |v|^2 = D exactly
        for start in range(0, k, d):
            block = x[start : start + d]
            np.testing.assert_allclose(block @ block.T, d * np.eye(len(block)), atol=1e-10)
        full = x[:d]
        np.testing.assert_allclose(full.T @ full / d, np.eye(d), atol=1e-10)  # a full block gives I exactly
        assert not np.allclose(x[d : 2 * d] @ full.T, 0, atol=1e-3)  # blocks are drawn independently


def test_orthogonal_probes_each_have_identity_second_moment_and_zero_mean(x64):
    """Over many keys, every probe of a block (full or partial) has E[v v^T] = I and E[v] = 0.

    The mean is what catches a QR without the sign fix: LAPACK's Householder Q makes the first
    coordinate of the first column always negative.
    """
    m, k, n, pad = 20_000, 8, 2, 3  # D = 6: one full block and a partial block of 2
    keys = jax.random.split(jax.random.PRNGKey(9), m)
    v = jax.vmap(lambda key: molecule_probes(key, "orthogonal", k, jnp.int32(n), pad, jnp.float64))(keys)
    v = np.asarray(v)  # [M, K, pad, 3]
    assert np.all(v[:, :, n:] == 0)
    x = v[:, :, :n].reshape(m, k, 3 * n)
    d = 3 * n
    for j in range(k):
        products = x[:, j, :, None] * x[:, j, None, :]  # [M, D, D]
        se = products.std(0, ddof=1) / np.sqrt(m)
        assert np.all(np.abs(products.mean(0) - np.eye(d)) <= 5 * se + 1e-12), j
        assert se.max() < 0.05
        se_mean = x[:, j].std(0, ddof=1) / np.sqrt(m)
        assert np.all(np.abs(x[:, j].mean(0)) <= 5 * se_mean), (j, x[:, j].mean(0))


def _psd_error_matrix(d: int, seed: int) -> np.ndarray:
    """A = B^T B, B = E / D with E a random symmetric 'model error' matrix: what PHL's loss sees."""
    e = np.random.default_rng(seed).standard_normal((d, d))
    b = (e + e.T) / d
    return b.T @ b


def test_variance_formulas_are_the_issues(x64):
    a = _psd_error_matrix(6, 0)
    d = 6
    off = sum(a[i, j] ** 2 for i in range(d) for j in range(d) if i != j)
    cross = sum(a[i, i] * a[k, k] for i in range(d) for k in range(d) if i != k)
    np.testing.assert_allclose(phljax.hutchinson_variance(a, "gaussian"), 2 * np.sum(a**2), rtol=1e-12)
    np.testing.assert_allclose(phljax.hutchinson_variance(a, "rademacher"), 2 * off, rtol=1e-12)
    onehot = (d - 1) * np.sum(np.diag(a) ** 2) - cross
    np.testing.assert_allclose(phljax.hutchinson_variance(a, "onehot"), onehot, rtol=1e-12)
    np.testing.assert_allclose(phljax.hutchinson_variance(a, "gaussian", 4), 2 * np.sum(a**2) / 4, rtol=1e-12)
    for k in (d, 2 * d):  # whole orthogonal blocks give the trace exactly
        assert float(phljax.hutchinson_variance(a, "orthogonal", k)) == pytest.approx(0.0, abs=1e-15)
    skew = np.triu(np.ones((d, d)), 1)  # v^T A v only sees the symmetric part
    np.testing.assert_allclose(phljax.hutchinson_variance(a + skew - skew.T, "rademacher"), 2 * off, rtol=1e-12)
    with pytest.raises(ValueError, match="square"):
        phljax.hutchinson_variance(a[:3], "gaussian")
    with pytest.raises(ValueError, match="num_probes"):
        phljax.hutchinson_variance(a, "gaussian", 0)
    with pytest.raises(ValueError, match="unknown probe distribution"):
        phljax.hutchinson_variance(a, "uniform")


@pytest.mark.parametrize(
    "distribution, k", [("gaussian", 1), ("rademacher", 1), ("onehot", 1), ("orthogonal", 1), ("orthogonal", 4),
                        ("orthogonal", 8), ("rademacher", 3)]
)  # fmt: skip
def test_variance_formulas_match_monte_carlo(x64, distribution, k):
    """Var of (1/K) sum_k v_k^T A v_k over many draws of the implemented probes = the formula.

    The standard error of a sample variance s^2 is sd((t - mean)^2) / sqrt(M); the test also
    requires it to be small next to the gaps between the families' formulas, so a formula of the
    wrong family (or a missing 1/K) cannot pass.
    """
    m, n = 40_000, 2  # D = 6, padded to 3 atoms
    d = 3 * n
    a = _psd_error_matrix(d, 1)
    keys = jax.random.split(jax.random.PRNGKey(10), m)
    v = jax.vmap(lambda key: molecule_probes(key, distribution, k, jnp.int32(n), 3, jnp.float64))(keys)
    x = np.asarray(v)[:, :, :n].reshape(m, k, d)
    t = np.einsum("mki,ij,mkj->m", x, a, x) / k  # [M] estimates of tr(A)
    dev2 = (t - t.mean()) ** 2
    var, se = dev2.sum() / (m - 1), dev2.std(ddof=1) / np.sqrt(m)
    expected = float(phljax.hutchinson_variance(a, distribution, k))
    assert abs(t.mean() - np.trace(a)) <= 5 * np.sqrt(var / m)  # unbiased
    assert abs(var - expected) <= 5 * se, (var, expected, se)
    others = [float(phljax.hutchinson_variance(a, f, kk)) for f in DISTRIBUTIONS for kk in (1, k)]
    gaps = [abs(o - expected) for o in others if abs(o - expected) > 1e-12 * expected]
    assert 5 * se < 0.5 * min(gaps), "too few samples to tell this family's variance from another's"


def test_pool_mode_draws_k_of_each_molecules_stored_probes(model64, curvature_batch, x64):
    """probe_mode='pool': each molecule draws K of its own P stored probes, without replacement,
    afresh each step; the reference HVPs travel with their probes; the loss is that of the draw."""
    batch, blocks = curvature_batch
    reference = curvature_batch[0]
    stored = phljax.batch_probes(jax.random.PRNGKey(7), "rademacher", 4, batch)  # P = 4
    batch = batch._replace(hvp_probes=stored, hvps=phljax.reference_hvp(batch, stored))
    batch = batch._replace(hessian=jnp.zeros_like(batch.hessian))  # not read from stored labels
    config = LossConfig(probe="random", num_probes=2, probe_mode="pool")
    assert not config.needs_hessian
    seed = jax.random.PRNGKey(3)
    draws = []
    for step in range(6):
        key = step_probe_key(seed, jnp.int32(step), config)
        v, ref = phljax.pool_draw(key, 2, batch)
        np.testing.assert_allclose(ref, phljax.reference_hvp(reference, v), rtol=1e-12, atol=1e-12)
        picks = []
        for g in range(3):
            nodes = np.asarray(batch.node_graph) == g
            pool = np.asarray(stored)[:, nodes]
            idx = [int(np.flatnonzero([np.array_equal(p, x) for p in pool])[0]) for x in np.asarray(v)[:, nodes]]
            assert len(set(idx)) == 2  # without replacement
            picks.append(tuple(idx))
        draws.append(tuple(picks))
        if step == 0:  # the curvature term is that of the drawn probes
            _, (_, metrics) = phljax.make_loss_fn(model64.energy_fn, config)(model64.params, batch, key)
            model_hv = phljax.reference_hvp(reference._replace(hessian=blocks), v)
            lh = np.asarray(phljax.hvp_loss(model_hv, ref, reference))[:3]
            np.testing.assert_allclose(metrics["hessian_loss"], lh.sum(), rtol=1e-10)
    assert len(set(draws)) > 1  # fresh draws over steps
    with pytest.raises(ValueError, match="num_probes <= stored probes"):
        phljax.pool_draw(seed, 5, batch)
