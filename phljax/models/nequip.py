"""A NequIP-style E(3)-equivariant energy model on e3nn-jax (flax linen).

Species embedding -> `num_layers` interaction blocks (tensor product of neighbour features with
spherical harmonics of the edge direction, weighted by an MLP of a Bessel radial basis times a
smooth polynomial cutoff, scatter-summed to the receiver, self-connection, gated nonlinearity)
-> per-atom scalar readout. Per-atom energies are `scale * readout + atomic_energies[Z]`.

Every operation is smooth (SiLU, tanh gates, polynomial envelope) and the edge geometry goes
through the double-`where` trick, so energies have finite derivatives to third order at padding
edges (zero length), coincident points and the cutoff: the HVP loss differentiates three times.

Op layout for cheap derivatives (same function, same parameters, float-rounding differences only;
benchmarks/flops.py and BENCHMARKS.md "FLOP accounting" count the effect):
- the envelope scales the spherical harmonics [n_edges, 9] instead of the radial weights
  [n_edges, num_irreps] (the tensor product is linear in them);
- the radial weights multiply the messages chunk by chunk as plain broadcasts, not through
  e3nn's `IrrepsArray * array` (an einsum with an identity Clebsch-Gordan matrix per chunk);
- the radial MLP (e3nn's `MultiLayerPerceptron`: its parameters, names and initialisation) is
  evaluated by `_radial_weights`, whose custom JVPs use that an edge's weights depend on its length
  alone: a position tangent costs an elementwise multiply by dw/dl (d2w/dl2 for the second order),
  not the MLP's matrix products again, so each extra HVP probe skips the radial MLP.

References:
    Batzner et al., "E(3)-equivariant graph neural networks for data-efficient and accurate
    interatomic potentials", Nat. Commun. 13, 2453 (2022).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence

import e3nn_jax as e3nn
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

__all__ = ["NequIP", "safe_edge_geometry"]


def safe_edge_geometry(
    vectors: jax.Array,  # [n_edges, 3] Angstrom
    edge_mask: jax.Array,  # [n_edges] bool
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Edge lengths and directions with finite derivatives of every order.

    Masked edges and zero-length edges get a dummy unit vector *before* the norm is taken
    (the double-`where` trick), so no NaN or inf enters even through the unselected branch.

    Returns:
        safe_vectors [n_edges, 3] (A), lengths [n_edges] (A), mask [n_edges] bool (real and
        non-degenerate edges).
    """
    r2 = jnp.sum(vectors**2, axis=-1)
    mask = edge_mask & (r2 > 1e-12)
    dummy = jnp.array([1.0, 0.0, 0.0], vectors.dtype)
    safe = jnp.where(mask[:, None], vectors, dummy)
    return safe, jnp.linalg.norm(safe, axis=-1), mask


class NequIP(nn.Module):
    """Per-atom energies of a padded molecular graph.

    Attributes:
        elements: atomic numbers the model knows; species index = position in this tuple.
        channels: multiplicity of each irrep in the hidden features.
        num_layers: interaction blocks.
        lmax: highest angular momentum of spherical harmonics and features.
        cutoff: radial cutoff, Angstrom.
        num_radial: Bessel basis functions.
        radial_hidden: width of the radial MLP.
        avg_num_neighbors: normalises the neighbour sum.
        atomic_energies: per-element reference energies (eV), same order as `elements`.
        scale: energy scale (eV) multiplying the network output.
    """

    elements: Sequence[int] = (1, 6, 7, 8)
    channels: int = 16
    num_layers: int = 2
    lmax: int = 2
    cutoff: float = 5.0
    num_radial: int = 8
    radial_hidden: int = 32
    avg_num_neighbors: float = 8.0
    atomic_energies: Sequence[float] | None = None
    scale: float = 1.0

    @nn.compact
    def __call__(
        self,
        positions: jax.Array,  # [n_nodes, 3] Angstrom
        numbers: jax.Array,  # [n_nodes] int atomic numbers (0 on padding)
        senders: jax.Array,  # [n_edges] int
        receivers: jax.Array,  # [n_edges] int
        edge_mask: jax.Array,  # [n_edges] bool
        node_mask: jax.Array,  # [n_nodes] bool
    ) -> jax.Array:  # [n_nodes] eV per atom (0 on padding)
        n_nodes = positions.shape[0]
        table = jnp.zeros(max(max(self.elements), 1) + 1, jnp.int32)
        table = table.at[jnp.asarray(self.elements)].set(jnp.arange(len(self.elements), dtype=jnp.int32))
        species = table[numbers]  # [n_nodes]
        one_hot = jax.nn.one_hot(species, len(self.elements), dtype=positions.dtype)

        vectors, lengths, mask = safe_edge_geometry(positions[receivers] - positions[senders], edge_mask)
        sh = e3nn.spherical_harmonics(
            e3nn.Irreps.spherical_harmonics(self.lmax), vectors, normalize=True, normalization="component"
        )
        # NequIP's p=6 envelope, smooth to second order at the cutoff; zero on masked edges.
        envelope = jnp.where(mask, e3nn.poly_envelope(5, 2, x_max=self.cutoff)(lengths), 0.0)  # [n_edges]
        # messages are bilinear in sh: scaling sh [n_edges, 9] scales them as scaling each weight would
        sh = sh * envelope[:, None]

        hidden = e3nn.Irreps([(self.channels, (ell, (-1) ** ell)) for ell in range(self.lmax + 1)])
        features = e3nn.flax.Linear(f"{self.channels}x0e")(e3nn.IrrepsArray(f"{len(self.elements)}x0e", one_hot))
        for _ in range(self.num_layers):
            features = _Interaction(hidden, self.avg_num_neighbors, self.radial_hidden, self.num_radial, self.cutoff)(
                features, sh, lengths, senders, receivers, n_nodes
            )

        scalars = features.filter(keep="0e")
        out = e3nn.flax.Linear(f"{self.channels}x0e")(scalars)
        out = e3nn.IrrepsArray(out.irreps, jax.nn.silu(out.array))
        out = e3nn.flax.Linear("0e")(out).array[:, 0]  # [n_nodes]
        ref = jnp.asarray(self.atomic_energies or [0.0] * len(self.elements), positions.dtype)
        return jnp.where(node_mask, self.scale * out + ref[species], 0.0)


def _scale_chunks(x: e3nn.IrrepsArray, weights: tuple[jax.Array, ...]) -> e3nn.IrrepsArray:
    """x * w with one weight per irrep copy, given per chunk of x ([..., mul] for a chunk [..., mul, dim]).

    The same numbers as e3nn's `x * w` for w [..., num_irreps], whose per-chunk einsum with an
    identity Clebsch-Gordan matrix is matrix products where a broadcast multiply suffices.
    """
    chunks = [None if c is None else c * w[..., None] for c, w in zip(x.chunks, weights, strict=True)]
    return e3nn.from_chunks(x.irreps, chunks, x.shape[:-1], x.dtype)


def _is_zero(tangent) -> bool:
    return isinstance(tangent, SymbolicZero)


def _instantiate(tangents):
    """Tangents with symbolic zeros made arrays of zeros."""
    zeros = lambda t: jnp.zeros(t.aval.shape, t.aval.dtype) if _is_zero(t) else t
    return jax.tree.map(zeros, tangents, is_leaf=_is_zero)


@functools.cache
def _radial_weights(num_radial: int, cutoff: float, splits: tuple[int, ...], normalization: float = 1.0):
    """`weights(kernels, lengths) -> (w [n_edges, m] for m in splits)`: e3nn's radial MLP of the Bessel basis.

    `kernels` are the MLP's (e3nn `MultiLayerPerceptron`: silu, no bias, each layer's product scaled
    by fan_in ** (-normalization / 2), e3nn's gradient normalisation, 1 for "path"), its output split
    into the messages' chunks. An edge's weights depend on its length l alone, so the
    tangent along a position tangent is dw/dl * l_dot: the custom JVPs compute dw/dl (and, for the
    tangent of that, d2w/dl2) once by forward mode in l and give every position tangent (each HVP
    probe; the force pass's reverse mode) for an elementwise multiply instead of the MLP's matrix
    products. Parameter tangents, and position and parameter tangents together, use ordinary
    autodiff of the same function, so every derivative of every order is the MLP's.
    """
    act = e3nn.normalize_function(jax.nn.silu)  # as e3nn's MLP
    cuts = list(itertools.accumulate(splits))[:-1]

    def plain(kernels, lengths):
        x = e3nn.bessel(lengths, num_radial, x_max=cutoff)  # [n_edges, num_radial]
        scaled = [k * k.shape[0] ** (-normalization / 2) for k in kernels]  # on the kernel, not on [n_edges, out]
        for k in scaled[:-1]:
            x = act(x @ k)
        return tuple(jnp.split(x @ scaled[-1], cuts, axis=-1))

    def first(kernels, lengths):  # (w, dw/dl)
        return jax.jvp(lambda r: plain(kernels, r), (lengths,), (jnp.ones_like(lengths),))

    def second(kernels, lengths):  # (w, dw/dl, d2w/dl2)
        (w, w1), (_, w2) = jax.jvp(lambda r: first(kernels, r), (lengths,), (jnp.ones_like(lengths),))
        return w, w1, w2

    def along(derivative, length_tangent):
        return tuple(d * length_tangent[:, None] for d in derivative)

    def only_lengths(tangents) -> bool:
        kernel_tangents, length_tangent = tangents
        return all(map(_is_zero, jax.tree.leaves(kernel_tangents, is_leaf=_is_zero))) and not _is_zero(length_tangent)

    def ordinary(fn, primals, tangents):
        (kernels, lengths), (kernel_tangents, length_tangent) = primals, tangents
        if _is_zero(length_tangent):
            return jax.jvp(lambda k: fn(k, lengths), (kernels,), (_instantiate(kernel_tangents),))
        return jax.jvp(fn, primals, (_instantiate(kernel_tangents), length_tangent))

    @jax.custom_jvp
    def weights(kernels, lengths):
        return plain(kernels, lengths)

    @jax.custom_jvp
    def weights_and_slope(kernels, lengths):
        return first(kernels, lengths)

    def weights_jvp(primals, tangents):
        if not only_lengths(tangents):
            return ordinary(plain, primals, tangents)
        w, w1 = weights_and_slope(*primals)
        return w, along(w1, tangents[1])

    def weights_and_slope_jvp(primals, tangents):
        if not only_lengths(tangents):
            return ordinary(first, primals, tangents)
        w, w1, w2 = second(*primals)
        return (w, w1), (along(w1, tangents[1]), along(w2, tangents[1]))

    weights.defjvp(weights_jvp, symbolic_zeros=True)
    weights_and_slope.defjvp(weights_and_slope_jvp, symbolic_zeros=True)
    return weights


class _Interaction(nn.Module):
    """One NequIP interaction block with a gated nonlinearity and a residual self-connection."""

    irreps: e3nn.Irreps
    avg_num_neighbors: float
    radial_hidden: int
    num_radial: int
    cutoff: float

    @nn.compact
    def __call__(self, features, sh, lengths, senders, receivers, n_nodes):
        # sh [n_edges, 9] carries the cutoff envelope (zero beyond the cutoff and on padding)
        gated = [(mul, ir) for mul, ir in self.irreps if ir.l > 0]
        n_gates = sum(mul for mul, _ in gated)
        scalars = [(mul, ir) for mul, ir in self.irreps if ir.l == 0]
        gate_in = e3nn.Irreps(scalars + [(n_gates, "0e")] + gated)

        self_connection = e3nn.flax.Linear(gate_in, force_irreps_out=True)(features)
        h = e3nn.flax.Linear(features.irreps)(features)
        messages = e3nn.tensor_product(h[senders], sh, filter_ir_out=gate_in)  # [n_edges, irreps]
        mlp = e3nn.flax.MultiLayerPerceptron(
            (self.radial_hidden, messages.irreps.num_irreps), act=jax.nn.silu, output_activation=False
        )
        if self.is_initializing():  # creates the MLP's parameters (names, shapes, initialisation: e3nn's)
            mlp(e3nn.bessel(lengths, self.num_radial, x_max=self.cutoff))
        layers = self.variables["params"][mlp.name]
        kernels = tuple(layers[f"Dense_{i}"]["kernel"] for i in range(len(layers)))
        normalization = e3nn.config("gradient_normalization")  # read as e3nn's MLP reads it
        normalization = {"element": 0.0, "path": 1.0}.get(normalization, normalization)
        splits = tuple(mul for mul, _ in messages.irreps)
        radial = _radial_weights(self.num_radial, self.cutoff, splits, float(normalization))
        messages = _scale_chunks(messages, radial(kernels, lengths))  # e3nn's MLP(bessel(lengths)) per irrep
        summed = e3nn.scatter_sum(messages, dst=receivers, output_size=n_nodes) / jnp.sqrt(self.avg_num_neighbors)
        update = e3nn.flax.Linear(gate_in, force_irreps_out=True)(summed)
        return e3nn.gate(self_connection + update, even_act=jax.nn.silu, odd_act=jax.nn.tanh, even_gate_act=jax.nn.silu)
