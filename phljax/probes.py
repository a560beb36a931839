"""Probe vectors for Hutchinson-style Hessian losses.

Every distribution satisfies E[v v^T] = I on a molecule's 3N real coordinates and is zero on
padding, so (1/D^2)|H_model v - H_ref v|^2 is an unbiased estimate of (1/D^2)||H_model - H_ref||_F^2:

- 'gaussian':   v ~ N(0, I) (the paper's experiments, "random" probes);
- 'rademacher': v_i = +-1 (the paper's theory section);
- 'onehot':     v = sqrt(3N) e_c, c uniform over the 3N coordinates ("one-column" probing).

Probes are keyed per molecule by its global index (`GraphBatch.graph_index`), never by its place in
a batch: the same molecule gets the same probe however the data are batched or sharded. The
*fixed* regime keys by (seed, molecule); the *randomized* regime adds the step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from phljax.data.batching import GraphBatch

__all__ = ["DISTRIBUTIONS", "RANDOM_DISTRIBUTIONS", "molecule_probes", "batch_probes", "probe_key"]

RANDOM_DISTRIBUTIONS = ("gaussian", "rademacher")  # the choices of --probe-dist (scheme E-F-HVP random)
DISTRIBUTIONS = (*RANDOM_DISTRIBUTIONS, "onehot")


def molecule_probes(
    key: jax.Array, distribution: str, num_probes: int, n_atoms: jax.Array, max_atoms: int, dtype=jnp.float32
) -> jax.Array:  # [K, A, 3], zero beyond n_atoms
    """K probes for one molecule of `n_atoms` real atoms, padded to `max_atoms`."""
    shape = (num_probes, max_atoms, 3)
    real = (jnp.arange(max_atoms) < n_atoms)[None, :, None]
    if distribution == "gaussian":
        v = jax.random.normal(key, shape, dtype)
    elif distribution == "rademacher":
        v = jax.random.rademacher(key, shape, dtype)
    elif distribution == "onehot":
        d = 3 * jnp.maximum(n_atoms, 1)
        c = jax.random.randint(key, (num_probes,), 0, d)  # uniform over the real coordinates
        v = jax.nn.one_hot(c, 3 * max_atoms, dtype=dtype).reshape(shape) * jnp.sqrt(d.astype(dtype))
    else:
        raise ValueError(f"unknown probe distribution {distribution!r}; expected one of {DISTRIBUTIONS}")
    return jnp.where(real, v, 0.0)


def probe_key(seed_key: jax.Array, step: jax.Array | int, randomized: bool) -> jax.Array:
    """Key for a step's probes: fresh every step (randomized) or the same for the whole run (fixed)."""
    return jax.random.fold_in(seed_key, step) if randomized else seed_key


def batch_probes(key: jax.Array, distribution: str, num_probes: int, batch: GraphBatch) -> jax.Array:
    """K probes spanning a padded batch, [K, n_nodes, 3], each molecule's keyed by its global index."""
    max_atoms = batch.graph_nodes.shape[1]
    keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.maximum(batch.graph_index, 0))
    per_graph = jax.vmap(
        lambda k, n: molecule_probes(k, distribution, num_probes, n, max_atoms, batch.positions.dtype)
    )(keys, batch.n_atoms)  # [G, K, A, 3]
    v = per_graph[batch.node_graph, :, batch.local_index]  # [N, K, 3]
    v = jnp.where(batch.node_mask[:, None, None], v, 0.0)
    return jnp.swapaxes(v, 0, 1)
