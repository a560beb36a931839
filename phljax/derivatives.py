"""Model-agnostic derivatives of an energy: forces, Hessian-vector products, Hessians.

Every function takes any `energy(positions, *args) -> scalar` (eV), with positions of any shape
(usually [n_atoms, 3] Angstrom) and any pytree of extra arguments, and works under `jit` and
`vmap`. For a padded batch of molecules, pass the *sum* of the molecules' energies: molecules do not
interact, so one `grad` gives every molecule's forces and one `jvp` with a probe spanning the batch
gives every molecule's HVP (the batch Hessian is block diagonal).

HVPs are forward-over-reverse (`jax.jvp` of `jax.grad`): the cost of a few gradient evaluations and
no Hessian in memory. `grad_and_hvp` returns the gradient from the same pass.
"""

from __future__ import annotations

from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp

__all__ = [
    "forces",
    "hvp",
    "grad_and_hvp",
    "value_grad_and_hvp",
    "hessian",
    "block_hessian",
    "value_grad_and_block_hessian",
    "batch_derivatives",
]

Energy = Callable[..., jax.Array]  # energy(positions, *args) -> scalar eV


def forces(energy: Energy, positions: jax.Array, *args) -> jax.Array:
    """F = -dE/dR, same shape as positions (eV/Angstrom)."""
    return -jax.grad(energy)(positions, *args)


def _probe_axis(positions: jax.Array, tangents: jax.Array) -> bool:
    if tangents.shape == positions.shape:
        return False
    if tangents.shape[1:] == positions.shape:
        return True
    raise ValueError(
        f"tangents must have the positions' shape {positions.shape} or [n_probes, *{positions.shape}], "
        f"got {tangents.shape}"
    )


def value_grad_and_hvp(
    energy: Energy, positions: jax.Array, tangents: jax.Array, *args, has_aux: bool = False
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Energy, gradient and H v from one forward-over-reverse pass.

    Args:
        energy: scalar energy function (eV); with `has_aux`, returns (scalar, aux).
        positions: [..., 3] Angstrom.
        tangents: probe(s) v, positions' shape or [n_probes, *positions.shape].
        *args: extra arguments of `energy` (any pytree), held fixed.
        has_aux: as in `jax.value_and_grad`.

    Returns:
        (E, dE/dR, H v): E scalar eV (or (E, aux)), dE/dR positions' shape eV/A, H v tangents'
        shape eV/A^2.
    """
    value_and_grad = jax.value_and_grad(lambda r: energy(r, *args), has_aux=has_aux)
    if not _probe_axis(positions, tangents) or tangents.shape[0] == 1:
        # one probe: a plain jvp, primal and tangent in one pass (no linearisation to store and re-apply)
        single = tangents if tangents.shape == positions.shape else tangents[0]
        (e, g), (_, hv) = jax.jvp(value_and_grad, (positions,), (single,))
        return e, g, hv.reshape(tangents.shape)
    # linearize once, push every probe through the same linear map: the primal pass is shared.
    (e, g), pushforward = jax.linearize(value_and_grad, positions)
    hv = jax.vmap(lambda v: pushforward(v)[1])(tangents)
    return e, g, hv


def grad_and_hvp(energy: Energy, positions: jax.Array, tangents: jax.Array, *args) -> tuple[jax.Array, jax.Array]:
    """(dE/dR, H v) in one pass; see `value_grad_and_hvp`."""
    _, g, hv = value_grad_and_hvp(energy, positions, tangents, *args)
    return g, hv


def hvp(energy: Energy, positions: jax.Array, tangents: jax.Array, *args) -> jax.Array:
    """Hessian-vector product H v (eV/A^2) along `tangents` (positions' shape, or a leading probe axis)."""
    return grad_and_hvp(energy, positions, tangents, *args)[1]


def _map_columns(column: Callable, xs: jax.Array, chunk_size: int | None) -> jax.Array:
    """`lax.map(column, xs)`, `chunk_size` columns at a time (None: all at once, fastest).

    With chunking each chunk is rematerialised (`jax.checkpoint`): under an outer gradient (E-F-H
    training) only one chunk's tangents are stored, not every column's, at the price of recomputing
    them. That is what makes `chunk_size` bound memory in training as well as in inference.
    """
    if chunk_size:
        column = jax.checkpoint(column)
    return jax.lax.map(column, xs, batch_size=chunk_size or xs.shape[0])


def hessian(energy: Energy, positions: jax.Array, *args, chunk_size: int | None = None) -> jax.Array:
    """Full Hessian d2E/dR dR, shape [*positions.shape, *positions.shape] (eV/A^2).

    Built from HVPs along the D = positions.size basis vectors, `chunk_size` columns at a time
    (None: all at once, fastest; smaller: bounded memory, also under a parameter gradient).
    """
    d = positions.size
    basis = jnp.eye(d, dtype=positions.dtype).reshape(d, *positions.shape)
    _, pushforward = jax.linearize(jax.grad(lambda r: energy(r, *args)), positions)
    columns = _map_columns(pushforward, basis, chunk_size)  # [D, *shape]
    return columns.reshape(*positions.shape, *positions.shape)  # symmetric, so rows == columns


def value_grad_and_block_hessian(
    energy: Energy,
    positions: jax.Array,  # [n_nodes, 3] Angstrom
    graph_nodes: jax.Array,  # [n_graphs, A] int node of each molecule's a-th atom (a padding node if none)
    *args,
    has_aux: bool = False,
    chunk_size: int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Energy, gradient and the diagonal blocks of a batch Hessian from one shared forward pass.

    Column (a, j) of every molecule at once: the probe is the unit vector on the a-th atom of every
    molecule, direction j. Because molecules do not interact, H of that probe gives, at node n,
    d2E / dR_n dR_{a-th atom of n's molecule, j}. Cost: 3A HVPs of the whole batch, A = max atoms
    per molecule, independent of the number of molecules; `chunk_size` columns at a time. Chunks
    are rematerialised (`jax.checkpoint`), so a parameter gradient of the blocks (E-F-H training)
    stores one chunk's tangents, not all 3A columns', at the price of recomputing them.

    Requires the padding nodes that `graph_nodes` points to beyond a molecule's atoms to be
    disconnected from real atoms and to carry no energy (as in `GraphBatch`): their columns then
    come back zero.

    Returns:
        (E, dE/dR [n_nodes, 3] eV/A, H blocks [n_nodes, 3, A, 3] eV/A^2 in local column form).
    """
    chex.assert_rank(graph_nodes, 2)
    chex.assert_shape(positions, (None, 3))
    n_nodes = positions.shape[0]
    max_atoms = graph_nodes.shape[1]
    value_and_grad = jax.value_and_grad(lambda r: energy(r, *args), has_aux=has_aux)
    (e, g), pushforward = jax.linearize(value_and_grad, positions)

    def column(c):  # c = 3 a + j: unit probe on the a-th atom of every molecule, direction j
        v = jnp.zeros((n_nodes, 3), positions.dtype).at[graph_nodes[:, c // 3], c % 3].set(1.0)
        return pushforward(v)[1]  # [n_nodes, 3]

    cols = _map_columns(column, jnp.arange(3 * max_atoms), chunk_size)  # [3A, N, 3]
    return e, g, cols.reshape(max_atoms, 3, n_nodes, 3).transpose(2, 3, 0, 1)


def block_hessian(
    energy: Energy, positions: jax.Array, graph_nodes: jax.Array, *args, chunk_size: int | None = None
) -> jax.Array:
    """Diagonal Hessian blocks of a padded batch, [n_nodes, 3, A, 3] eV/A^2; see
    `value_grad_and_block_hessian`."""
    return value_grad_and_block_hessian(energy, positions, graph_nodes, *args, chunk_size=chunk_size)[2]


def batch_derivatives(
    energy_fn: Callable,
    params,
    batch,
    *,
    probes: jax.Array | None = None,  # [K, n_nodes, 3] or None
    hessian_blocks: bool = False,
    chunk_size: int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Energies, gradient and one kind of curvature of a padded batch, from one shared pass.

    The one derivative dispatch of the losses and the evaluation: `energy_fn(params, batch) ->
    [n_graphs]` eV is differentiated through the sum of the molecules' energies (molecules do not
    interact), at `batch.positions` [n_nodes, 3] Angstrom.

    Args:
        energy_fn: `(params, batch) -> [n_graphs]` energies, eV.
        params: model parameters (any pytree).
        batch: a `phljax.data.GraphBatch` (positions [n_nodes, 3] A, graph_nodes [n_graphs, A]).
        probes: probes spanning the batch, [K, n_nodes, 3]: return H v.
        hessian_blocks: return the diagonal Hessian blocks (`value_grad_and_block_hessian`).
        chunk_size: Hessian columns per HVP batch (None: all at once).

    Returns:
        (E [n_graphs] eV, dE/dR [n_nodes, 3] eV/A, curvature): H v [K, n_nodes, 3] eV/A^2 with
        `probes`, blocks [n_nodes, 3, A, 3] eV/A^2 with `hessian_blocks`, else None.
    """
    if probes is not None and hessian_blocks:
        raise ValueError("ask for either probes (HVPs) or hessian_blocks, not both")

    def total(r):  # [n_nodes, 3] A -> (sum of energies, [n_graphs] energies), eV
        e = energy_fn(params, batch._replace(positions=r))
        return e.sum(), e

    if hessian_blocks:
        (_, e), g, blocks = value_grad_and_block_hessian(
            total, batch.positions, batch.graph_nodes, has_aux=True, chunk_size=chunk_size
        )
        return e, g, blocks
    if probes is not None:
        chex.assert_shape(probes, (None, *batch.positions.shape))
        (_, e), g, hv = value_grad_and_hvp(total, batch.positions, probes, has_aux=True)
        return e, g, hv
    (_, e), g = jax.value_and_grad(total, has_aux=True)(batch.positions)
    return e, g, None
