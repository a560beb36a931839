"""phljax.derivatives in float64: every route to a second derivative agrees.

First on energies that are not phljax's (a Morse and a Lennard-Jones potential), then on the model,
where a molecule's energy, forces, HVPs and Hessian must not depend on what else is in its batch.
"""

from __future__ import annotations

import e3nn_jax as e3nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from synthetic import morse_energy

import phljax
from phljax import data as phdata
from phljax.models.nequip import _radial_weights


def lennard_jones(positions, params):
    """Pair LJ energy (eV) with a pytree of parameters {'epsilon': [], 'sigma': []} (eV, Angstrom)."""
    n = positions.shape[0]
    d = positions[:, None] - positions[None]
    r2 = jnp.sum(d**2, -1) + jnp.eye(n)
    s6 = (params["sigma"] ** 2 / r2) ** 3
    return 2.0 * params["epsilon"] * jnp.sum(jnp.where(jnp.eye(n, dtype=bool), 0.0, s6**2 - s6))


LJ = {"epsilon": 0.0103, "sigma": 3.40}  # argon


def _argon_cluster(seed=0, n=5):
    rng = np.random.default_rng(seed)
    base = np.array([[0, 0, 0], [3.8, 0, 0], [0, 3.8, 0], [0, 0, 3.8], [3.8, 3.8, 0], [0, 3.8, 3.8]], float)[:n]
    return jnp.asarray(base + rng.normal(scale=0.15, size=base.shape))


# Jitted once per energy: run eagerly, every primitive would be dispatched and compiled on its own.
jit_hessian = jax.jit(lambda energy, r, *args: jax.hessian(energy)(r, *args), static_argnums=0)
jit_grad = jax.jit(lambda energy, r, *args: jax.grad(energy)(r, *args), static_argnums=0)
jit_hvp = jax.jit(phljax.hvp, static_argnums=0)
jit_forces = jax.jit(phljax.forces, static_argnums=0)


def _fd_hvp(forces_fn, positions, v, h=1e-5):
    """Central finite difference of forces along v: H v = -(F(R + h v) - F(R - h v)) / 2h."""
    return -(forces_fn(positions + h * v) - forces_fn(positions - h * v)) / (2 * h)


@pytest.fixture
def morse(molecules, x64):
    """(energy(r, numbers), positions, numbers, reference Hessian [3n, 3n]) of a distorted NH3."""
    mol = molecules[8]
    numbers = jnp.asarray(mol.numbers)
    return morse_energy, jnp.asarray(mol.positions), numbers, mol.hessian.reshape(3 * mol.n_atoms, -1)


def test_hvp_equals_hessian_times_v_and_finite_difference(morse):
    energy, r, z, h_ref = morse
    d = r.size
    h = jit_hessian(energy, r, z).reshape(d, d)
    np.testing.assert_allclose(h, h_ref, rtol=1e-12, atol=1e-12)  # the stored labels are that Hessian
    v = jax.random.normal(jax.random.PRNGKey(0), r.shape, jnp.float64)
    hv = jit_hvp(energy, r, v, z)
    assert hv.shape == r.shape and hv.dtype == jnp.float64
    np.testing.assert_allclose(hv.ravel(), h @ v.ravel(), rtol=1e-10, atol=1e-12)
    fd = _fd_hvp(lambda x: jit_forces(energy, x, z), r, v)
    np.testing.assert_allclose(hv, fd, rtol=1e-6, atol=1e-8)
    assert np.abs(hv).max() > 0.1  # a real curvature, not a vacuous comparison


def test_grad_and_hvp_share_one_pass(morse):
    energy, r, z, _ = morse
    v = jax.random.rademacher(jax.random.PRNGKey(1), r.shape, jnp.float64)
    g, hv = jax.jit(phljax.grad_and_hvp, static_argnums=0)(energy, r, v, z)
    np.testing.assert_allclose(g, jit_grad(energy, r, z), rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(jit_forces(energy, r, z), -g, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(hv, jit_hvp(energy, r, v, z), rtol=1e-13, atol=1e-13)
    e, g2, hv2 = jax.jit(phljax.value_grad_and_hvp, static_argnums=0)(energy, r, v, z)
    np.testing.assert_allclose(e, energy(r, z), rtol=1e-14)
    np.testing.assert_allclose(g2, g, rtol=1e-13, atol=1e-13)

    def with_aux(x, numbers):
        e = energy(x, numbers)
        return e, {"twice": 2 * e}

    (e3, aux), g3, hv3 = jax.jit(phljax.value_grad_and_hvp, static_argnums=0, static_argnames="has_aux")(
        with_aux, r, v, z, has_aux=True
    )
    np.testing.assert_allclose(aux["twice"], 2 * e, rtol=1e-14)
    np.testing.assert_allclose(g3, g, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(hv3, hv, rtol=1e-13, atol=1e-13)


def test_leading_probe_axis(morse):
    energy, r, z, h_ref = morse
    vs = jax.random.normal(jax.random.PRNGKey(2), (4, *r.shape), jnp.float64)
    e, g, hvs = jax.jit(phljax.value_grad_and_hvp, static_argnums=0)(energy, r, vs, z)
    assert hvs.shape == vs.shape and g.shape == r.shape and e.shape == ()
    np.testing.assert_allclose(hvs.reshape(4, -1), vs.reshape(4, -1) @ h_ref.T, rtol=1e-10, atol=1e-12)
    for k in range(4):
        np.testing.assert_allclose(hvs[k], jit_hvp(energy, r, vs[k], z), rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(g, jit_grad(energy, r, z), rtol=1e-13, atol=1e-13)
    with pytest.raises(ValueError, match="tangents must have"):
        phljax.hvp(energy, r, vs[:, :2], z)
    # one probe on the axis takes a plain jvp (no linearisation): the same numbers, the axis kept
    e1, g1, hv1 = jax.jit(phljax.value_grad_and_hvp, static_argnums=0)(energy, r, vs[:1], z)
    assert hv1.shape == (1, *r.shape)
    np.testing.assert_allclose(hv1[0], hvs[0], rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(g1, g, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(e1, e, rtol=1e-14)


def test_jit_vmap_and_pytree_arguments(x64):
    r = _argon_cluster()
    params = {"epsilon": jnp.float64(LJ["epsilon"]), "sigma": jnp.float64(LJ["sigma"])}
    v = jax.random.normal(jax.random.PRNGKey(3), r.shape, jnp.float64)
    d = r.size
    h = jit_hessian(lennard_jones, r, params).reshape(d, d)
    hv = jit_hvp(lennard_jones, r, v, params)  # under jit, with a pytree argument
    np.testing.assert_allclose(hv.ravel(), h @ v.ravel(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(hv, _fd_hvp(lambda x: jit_forces(lennard_jones, x, params), r, v), rtol=1e-6, atol=1e-9)
    assert np.abs(hv).max() > 1e-3
    g_jit, hv_jit = jax.jit(phljax.grad_and_hvp, static_argnums=0)(lennard_jones, r, v, params)
    np.testing.assert_allclose(hv_jit, hv, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(g_jit, jit_grad(lennard_jones, r, params), rtol=1e-12, atol=1e-14)

    # vmap over geometries, probes and the parameter pytree together
    rs = jnp.stack([_argon_cluster(seed) for seed in range(3)])
    vs = jax.random.normal(jax.random.PRNGKey(4), rs.shape, jnp.float64)
    ps = {"epsilon": jnp.array([0.0103, 0.0104, 0.02]), "sigma": jnp.array([3.40, 3.35, 3.5])}
    batched = jax.jit(jax.vmap(lambda x, t, p: phljax.hvp(lennard_jones, x, t, p)))(rs, vs, ps)
    for i in range(3):
        p_i = jax.tree.map(lambda x, i=i: x[i], ps)
        h_i = jit_hessian(lennard_jones, rs[i], p_i).reshape(d, d)
        np.testing.assert_allclose(batched[i].ravel(), h_i @ vs[i].ravel(), rtol=1e-10, atol=1e-12)

    # derivatives with respect to the parameters flow through the HVP (what a learned potential needs)
    square = jax.jit(lambda p: jnp.sum(phljax.hvp(lennard_jones, r, v, p) ** 2))
    dhv = jax.jit(jax.grad(square))(params)
    eps = 1e-6
    for k in params:
        fd = (square({**params, k: params[k] + eps}) - square({**params, k: params[k] - eps})) / (2 * eps)
        np.testing.assert_allclose(dhv[k], fd, rtol=1e-6)


@pytest.mark.parametrize("chunk_size", [None, 1, 4, 9])
def test_chunked_hessian(morse, chunk_size):
    energy, r, z, h_ref = morse  # D = 12: chunk 4 divides it, chunk 9 leaves a remainder
    h = jax.jit(phljax.hessian, static_argnums=0, static_argnames="chunk_size")(energy, r, z, chunk_size=chunk_size)
    assert h.shape == (*r.shape, *r.shape)
    np.testing.assert_allclose(h, jit_hessian(energy, r, z), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(h.reshape(h_ref.shape), h_ref, rtol=1e-12, atol=1e-12)


# -- padded batches: a Morse energy over the edges of a GraphBatch (not phljax's model) --------------


def batch_morse(positions, batch):
    """The sum over molecules of `synthetic.morse_energy`, written over the batch's edges (eV).

    Edges must cover every intra-molecular pair. Padding edges (zero length) go through the
    double-`where` trick so that their derivatives stay finite.
    """
    z = batch.numbers.astype(positions.dtype)
    zs, zr = z[batch.senders], z[batch.receivers]
    d = positions[batch.receivers] - positions[batch.senders]
    safe = jnp.where(batch.edge_mask[:, None], d, 1.0)
    r = jnp.sqrt(jnp.sum(safe**2, -1))
    r0 = 0.5 + 0.06 * jnp.sqrt(jnp.where(batch.edge_mask, zs + zr, 1.0))
    depth = 0.2 + 0.02 * jnp.sqrt(zs * zr)
    pair = depth * (1 - jnp.exp(-1.8 * (r - r0))) ** 2 - depth
    return 0.5 * jnp.sum(jnp.where(batch.edge_mask, pair, 0.0)) + 0.1 * jnp.sum(z * batch.node_mask)


def _local_block(blocks, batch, g):
    """Molecule g's [3n, 3n] Hessian from local-column blocks [N, 3, A, 3]."""
    n = int(batch.n_atoms[g])
    nodes = np.asarray(batch.graph_nodes[g, :n])
    return np.asarray(blocks)[nodes][:, :, :n].reshape(3 * n, 3 * n)


def _full_block(hessian, batch, g):
    """Molecule g's [3n, 3n] block of a full batch Hessian [N, 3, N, 3]."""
    n = int(batch.n_atoms[g])
    nodes = np.asarray(batch.graph_nodes[g, :n])
    return np.asarray(hessian)[nodes][:, :, nodes].reshape(3 * n, 3 * n)


def test_block_hessian_of_a_padded_batch_is_each_molecules_hessian(molecules, x64):
    mols = [molecules[i] for i in (2, 13, 19, 7)]  # H2O, CH4, H2CO, NH3
    budget = phdata.budget_for(molecules, 5, 10.0, with_hessian=True)  # every pair is an edge
    batch = jax.tree.map(jnp.asarray, phdata.make_batch(mols, budget, 10.0, dtype=np.float64))
    # the batch energy is the molecules' Morse energies (the labels) summed
    np.testing.assert_allclose(jax.jit(batch_morse)(batch.positions, batch), sum(m.energy for m in mols), rtol=1e-12)

    for chunk in (None, 4):
        blocks = jax.jit(phljax.block_hessian, static_argnums=0, static_argnames="chunk_size")(
            batch_morse, batch.positions, batch.graph_nodes, batch, chunk_size=chunk
        )
        assert blocks.shape == (budget.n_nodes, 3, budget.max_atoms, 3)
        for g, m in enumerate(mols):
            n = m.n_atoms
            np.testing.assert_allclose(_local_block(blocks, batch, g), m.hessian.reshape(3 * n, 3 * n), atol=1e-11)
        # the same local-column layout as the labels `make_batch` stores
        np.testing.assert_allclose(blocks, batch.hessian, atol=1e-11)
        # columns beyond a molecule's atoms, and padding rows, are exactly zero
        real_col = np.arange(budget.max_atoms)[None] < np.asarray(batch.n_atoms)[np.asarray(batch.node_graph)][:, None]
        assert np.all(np.asarray(blocks)[~np.asarray(batch.node_mask)] == 0)
        assert np.all(np.transpose(np.asarray(blocks), (0, 2, 1, 3))[~real_col] == 0)

    e, g, blocks = jax.jit(phljax.value_grad_and_block_hessian, static_argnums=0)(
        batch_morse, batch.positions, batch.graph_nodes, batch
    )
    np.testing.assert_allclose(e, sum(m.energy for m in mols), rtol=1e-12)
    forces = np.concatenate([m.forces for m in mols])
    np.testing.assert_allclose(-np.asarray(g)[: len(forces)], forces, atol=1e-11)
    assert np.all(np.asarray(g)[len(forces) :] == 0)


# -- the model ------------------------------------------------------------------------------------------


def test_radial_weights_custom_jvps_are_the_mlps_derivatives(x64):
    """The model's radial MLP runs through custom JVPs that exploit its per-edge scalar input (the
    length); every derivative the training steps and Hessians take must be e3nn's MLP's, by ordinary
    autodiff: values, first to third length derivatives, kernel derivatives, and the parameter
    gradient of a second length derivative (what the HVP loss differentiates)."""
    num_radial, cutoff, splits = 8, 4.0, (3, 2, 4)
    mlp = e3nn.flax.MultiLayerPerceptron((6, sum(splits)), act=jax.nn.silu, output_activation=False)
    lengths = jnp.linspace(0.7, 3.9, 11)
    params = mlp.init(jax.random.PRNGKey(1), e3nn.bessel(lengths, num_radial, x_max=cutoff))["params"]
    kernels = (params["Dense_0"]["kernel"], params["Dense_1"]["kernel"])
    custom = _radial_weights(num_radial, cutoff, splits)

    def reference(k, r):  # e3nn's MLP of the Bessel basis, split as the messages' chunks
        w = mlp.apply(
            {"params": {"Dense_0": {"kernel": k[0]}, "Dense_1": {"kernel": k[1]}}},
            e3nn.bessel(r, num_radial, x_max=cutoff),
        )
        return tuple(jnp.split(w, np.cumsum(splits)[:-1], axis=-1))

    def along(fn, order, dr):  # the order-th derivative of fn along dr, by nested jvps
        g = fn
        for _ in range(order):
            g = (lambda h: lambda k, r: jax.jvp(lambda s: h(k, s), (r,), (dr,))[1])(g)
        return g

    dr = jnp.cos(jnp.arange(11.0))
    dk = jax.tree.map(lambda k: jnp.sin(jnp.arange(k.size, dtype=k.dtype)).reshape(k.shape), kernels)
    for order in range(4):
        np.testing.assert_allclose(
            jnp.concatenate(jax.jit(along(custom, order, dr))(kernels, lengths), -1),
            jnp.concatenate(jax.jit(along(reference, order, dr))(kernels, lengths), -1),
            rtol=1e-12,
            atol=1e-12,
        )
    for fn in (custom, along(custom, 1, dr)):  # kernel tangents, and kernel and length tangents together
        ref = reference if fn is custom else along(reference, 1, dr)
        for tangents in ((dk, jnp.zeros_like(lengths)), (dk, dr)):
            got = jax.jvp(fn, (kernels, lengths), tangents)[1]
            want = jax.jvp(ref, (kernels, lengths), tangents)[1]
            np.testing.assert_allclose(jnp.concatenate(got, -1), jnp.concatenate(want, -1), rtol=1e-12, atol=1e-12)

    def curvature_loss(fn):  # a scalar of the second length derivative, as an HVP loss is
        return lambda k: sum(jnp.sum(jnp.sin(w)) for w in along(fn, 2, dr)(k, lengths))

    for got, want in zip(
        jax.tree.leaves(jax.jit(jax.grad(curvature_loss(custom)))(kernels)),
        jax.tree.leaves(jax.jit(jax.grad(curvature_loss(reference)))(kernels)),
        strict=True,
    ):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_model_radial_mlp_parameters_are_e3nns(model64):
    """The radial MLP's parameters keep e3nn's MultiLayerPerceptron layout (checkpoints stay loadable)."""
    for layer in ("_Interaction_0",):
        mlp = model64.params["params"][layer]["MultiLayerPerceptron_0"]
        assert sorted(mlp) == ["Dense_0", "Dense_1"] and all(list(d) == ["kernel"] for d in mlp.values())
        assert mlp["Dense_0"]["kernel"].shape[0] == model64.model.num_radial


def test_model_hvp_equals_hessian_times_v_and_finite_difference(model64, molecules, x64):
    batch = model64.batch([molecules[i] for i in (1, 15, 22)])
    n_real = int(batch.node_mask.sum())
    probes = phljax.batch_probes(jax.random.PRNGKey(5), "gaussian", 2, batch)
    out = model64.derivs(batch, probes)
    d = batch.positions.size
    h = out["hessian"].reshape(d, d)
    np.testing.assert_allclose(h, h.T, atol=1e-12)  # a Hessian is symmetric

    def total(r):
        return model64.energy_fn(model64.params, batch._replace(positions=r)).sum()

    np.testing.assert_allclose(h, jax.jit(jax.hessian(total))(batch.positions).reshape(d, d), atol=1e-12)
    for k in range(2):
        np.testing.assert_allclose(out["hvp"][k].ravel(), h @ np.ravel(probes[k]), rtol=1e-10, atol=1e-12)
        fd = _fd_hvp(lambda r: model64.derivs(batch._replace(positions=r))["forces"], batch.positions, probes[k])
        np.testing.assert_allclose(out["hvp"][k], fd, rtol=1e-6, atol=1e-8)
    assert np.abs(out["hvp"][:, :n_real]).max() > 1e-2
    # padding nodes feel no force and no curvature
    assert np.all(out["forces"][n_real:] == 0) and np.all(out["hvp"][:, n_real:] == 0)
    # molecules do not interact: the batch Hessian is block diagonal
    graph = np.asarray(batch.node_graph)
    other = graph[:, None] != graph[None, :]
    assert np.all(np.transpose(out["hessian"], (0, 2, 1, 3))[other] == 0)


def test_model_molecule_alone_and_in_a_padded_batch(model64, molecules, x64):
    mol = molecules[20]
    alone = model64.batch([mol], indices=[20])
    together = model64.batch([molecules[3], mol, molecules[9]], indices=[3, 20, 9])  # mol is graph 1
    n = mol.n_atoms
    nodes = np.asarray(together.graph_nodes[1, :n])
    assert nodes[0] > 0  # it does not sit at the start of the batch

    v_alone = phljax.batch_probes(jax.random.PRNGKey(6), "gaussian", 2, alone)
    v_together = phljax.batch_probes(jax.random.PRNGKey(6), "gaussian", 2, together)  # keyed by index 20
    np.testing.assert_array_equal(v_together[:, nodes], v_alone[:, :n])

    a = model64.derivs(alone, v_alone)
    b = model64.derivs(together, v_together)
    np.testing.assert_allclose(b["energy"][1], a["energy"][0], rtol=1e-13)
    np.testing.assert_allclose(b["forces"][nodes], a["forces"][:n], rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(b["hvp"][:, nodes], a["hvp"][:, :n], rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(_full_block(b["hessian"], together, 1), _full_block(a["hessian"], alone, 0), atol=1e-12)
    # padding graphs carry no energy
    assert np.all(a["energy"][1:] == 0) and np.all(b["energy"][3:] == 0)


def test_model_block_hessian_equals_each_molecules_own_hessian(model64, molecules, x64):
    mols = [molecules[i] for i in (0, 12, 6)]  # 3 + 5 + 4 atoms
    batch = model64.batch(mols)
    out = model64.derivs(batch)
    for g, m in enumerate(mols):
        own = model64.derivs(model64.batch([m]))["hessian"]
        n = m.n_atoms
        expected = own[:n, :, :n, :].reshape(3 * n, 3 * n)
        np.testing.assert_allclose(_local_block(out["blocks"], batch, g), expected, atol=1e-12)
        np.testing.assert_allclose(_full_block(out["hessian"], batch, g), expected, atol=1e-12)
        assert np.abs(expected).max() > 1e-2


def test_chunked_hessians_bound_memory_under_a_parameter_gradient():
    """E-F-H training differentiates the Hessian with respect to parameters. Without rematerialised
    chunks, `lax.map` under that gradient keeps every column's tangents and chunking saves nothing.
    Compile only: XLA's temporaries for the parameter gradient of a Hessian loss, chunked vs not."""
    n, width = 24, 32
    key_w, key_r = jax.random.split(jax.random.PRNGKey(0))
    params = {"w": 0.1 * jax.random.normal(key_w, (width,)), "b": jnp.linspace(-1.0, 1.0, width)}
    positions = 2.0 * jax.random.normal(key_r, (n, 3))

    def pair_mlp_energy(r, p):  # a smooth pair energy whose intermediates are [n, n, width]
        d2 = jnp.sum((r[:, None] - r[None]) ** 2, -1) + 1.0
        return jnp.sum(jnp.tanh(d2[..., None] * p["w"] + p["b"]))

    def temp_bytes(hess_fn, chunk_size):
        def loss(p):
            return jnp.sum(hess_fn(pair_mlp_energy, chunk_size, p) ** 2)

        return jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes

    full = lambda e, c, p: phljax.hessian(e, positions, p, chunk_size=c)  # noqa: E731
    nodes = jnp.arange(n)[None]  # one molecule, every node an atom
    blocks = lambda e, c, p: phljax.block_hessian(e, positions, nodes, p, chunk_size=c)  # noqa: E731
    for hess_fn in (full, blocks):
        all_columns, chunked = temp_bytes(hess_fn, None), temp_bytes(hess_fn, 6)
        assert chunked < 0.3 * all_columns, (hess_fn, chunked, all_columns)
