"""Probe vectors for Hutchinson-style Hessian losses.

Every distribution satisfies E[v v^T] = I on a molecule's 3N real coordinates and is zero on
padding, so (1/D^2)|H_model v - H_ref v|^2 is an unbiased estimate of (1/D^2)||H_model - H_ref||_F^2:

- 'gaussian':   v ~ N(0, I) (the paper's experiments, "random" probes);
- 'rademacher': v_i = +-1 (the paper's theory section);
- 'onehot':     v = sqrt(3N) e_c, c uniform over the 3N coordinates ("one-column" probing);
- 'orthogonal': the K probes of a molecule are sqrt(3N) times the columns of a random (Haar)
                3N x K orthonormal frame (blocks of 3N for K > 3N, the last one partial):
                each probe is uniform on the sphere of radius sqrt(3N), and probes of one block
                are orthogonal, so K = 3N probes give the trace exactly.

:func:`hutchinson_variance` gives, for each family, the variance of the K-probe estimate
(1/K) sum_k v_k^T A v_k of tr(A); with A = B^T B, B = (H_model - H_ref)/D, that is the variance
of the HVP loss around the full Hessian loss.

Probes are keyed per molecule by its global index (`GraphBatch.graph_index`), never by its place in
a batch: the same molecule gets the same probe however the data are batched or sharded. The
*fixed* regime keys by (seed, molecule); the *randomized* regime adds the step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from phljax.data.batching import GraphBatch

__all__ = [
    "DISTRIBUTIONS",
    "RANDOM_DISTRIBUTIONS",
    "molecule_probes",
    "batch_probes",
    "probe_key",
    "hutchinson_variance",
]

RANDOM_DISTRIBUTIONS = ("gaussian", "rademacher", "orthogonal")  # the choices of --probe-dist (E-F-HVP random)
DISTRIBUTIONS = (*RANDOM_DISTRIBUTIONS, "onehot")


def molecule_probes(
    key: jax.Array, distribution: str, num_probes: int, n_atoms: jax.Array, max_atoms: int, dtype=jnp.float32
) -> jax.Array:  # [K, A, 3], zero beyond n_atoms
    """K probes for one molecule of `n_atoms` real atoms, padded to `max_atoms`.

    Args:
        key: PRNG key of this molecule's probes.
        distribution: one of :data:`DISTRIBUTIONS`.
        num_probes: K (static).
        n_atoms: real atoms (int scalar, may be traced; 0 for a padding graph: all zero).
        max_atoms: padded atoms A (static).

    Returns:
        [K, A, 3] dimensionless, E[v v^T] = I on the 3 n_atoms real coordinates, zero beyond them.
    """
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
    elif distribution == "orthogonal":
        v = _orthogonal(key, num_probes, 3 * jnp.maximum(n_atoms, 1), 3 * max_atoms, dtype).reshape(shape)
    else:
        raise ValueError(f"unknown probe distribution {distribution!r}; expected one of {DISTRIBUTIONS}")
    return jnp.where(real, v, 0.0)


def _orthogonal(key: jax.Array, num_probes: int, d: jax.Array, d_max: int, dtype) -> jax.Array:  # [K, d_max]
    """sqrt(d) x the columns of Haar-random orthonormal blocks in the first d of d_max coordinates.

    Probe k is column k % d of block k // d. Each block is the Q of a QR decomposition of a Gaussian
    [d_max, W] matrix whose rows beyond d are zero (so Q's first d columns span only the real
    coordinates), with the signs of R's diagonal folded into Q (without this fix Q is not Haar
    distributed). d is traced, so the number of blocks is sized for the smallest molecule (d = 3)
    and W = min(K, d_max) columns per block.
    """
    width = min(num_probes, d_max)
    n_blocks = -(-num_probes // 3)
    g = jax.random.normal(key, (n_blocks, d_max, width), dtype)
    g = jnp.where((jnp.arange(d_max) < d)[None, :, None], g, 0.0)
    q, r = jnp.linalg.qr(g)  # [B, d_max, W], [B, W, W]
    q = q * jnp.where(jnp.diagonal(r, axis1=-2, axis2=-1) < 0, -1.0, 1.0)[:, None, :].astype(dtype)
    k = jnp.arange(num_probes)
    return q[k // d, :, k % d] * jnp.sqrt(d.astype(dtype))


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


def pool_draw(key: jax.Array, num_probes: int, batch: GraphBatch) -> tuple[jax.Array, jax.Array]:
    """Draw K of each molecule's stored probes (without replacement) and their reference HVPs.

    The randomized regime over a finite pool: ``batch.hvp_probes`` / ``batch.hvps`` [P, N, 3] hold
    P stored probes per molecule (data with Hessian-free labels); each molecule, keyed by its global
    index, draws its own K of them, fresh for every new ``key``.

    Returns:
        (probes [K, n_nodes, 3] dimensionless, reference HVPs [K, n_nodes, 3] eV/A^2).
    """
    pool = batch.hvp_probes.shape[0]
    if not 1 <= num_probes <= pool:
        raise ValueError(f"need 1 <= num_probes <= stored probes ({pool}), got {num_probes}")
    keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.maximum(batch.graph_index, 0))
    order = jax.vmap(lambda k: jax.random.permutation(k, pool))(keys)[:, :num_probes]  # [G, K]
    pick = order[batch.node_graph]  # [N, K]

    def take(x):  # [P, N, 3] -> [K, N, 3]
        return jnp.swapaxes(jnp.take_along_axis(jnp.swapaxes(x, 0, 1), pick[:, :, None], axis=1), 0, 1)

    return take(batch.hvp_probes), take(batch.hvps)


def _symmetric(a: jax.Array) -> jax.Array:  # [D, D]
    a = jnp.asarray(a)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"expected a square matrix [D, D], got shape {a.shape}")
    return 0.5 * (a + a.T)


def hutchinson_variance(a: jax.Array, distribution: str, num_probes: int = 1) -> jax.Array:  # scalar
    """Variance of the K-probe Hutchinson estimate t = (1/K) sum_k v_k^T A v_k of tr(A).

    v^T A v only sees the symmetric part S = (A + A^T)/2, so the formulas are of S (D x D):

    - gaussian:   2 ||S||_F^2 / K;
    - rademacher: 2 sum_{i != j} S_ij^2 / K;
    - onehot (v = sqrt(D) e_c, c uniform; v^T S v = D S_cc):
      D sum_i S_ii^2 - (tr S)^2 = (D - 1) sum_i S_ii^2 - sum_{i != k} S_ii S_kk, over K;
    - orthogonal (blocks of D orthonormal probes scaled by sqrt(D)): with S0 = S - (tr S / D) I,
      a block of k probes has Var[sum v^T S v] = 2 D k (D - k) ||S0||_F^2 / ((D + 2)(D - 1));
      independent blocks add, and t divides their sum by K. So K = D gives 0, and K = 1 gives
      2 D ||S0||_F^2 / (D + 2) (below the Gaussian 2 ||S||_F^2).

    Derivation of the orthogonal case: for q uniform on the unit sphere of R^D,
    E[(q^T S0 q)^2] = 2 ||S0||_F^2 / (D (D + 2)) (and E[q^T S0 q] = 0); the D columns of an
    orthogonal matrix give sum_k q_k^T S0 q_k = tr S0 = 0, so the covariance of two columns is
    -Var / (D - 1), and k of them have variance k Var (D - k) / (D - 1).

    Args:
        a: [D, D] matrix (e.g. A = B^T B with B = (H_model - H_ref) / D, D = 3N).
        distribution: one of :data:`DISTRIBUTIONS`.
        num_probes: K >= 1 probes averaged.

    Returns:
        The variance, a scalar in the unit of a squared.

    Raises:
        ValueError: on a non-square matrix, an unknown distribution or num_probes < 1.

    References:
        M. F. Hutchinson, "A stochastic estimator of the trace of the influence matrix for
        Laplacian smoothing splines", Commun. Stat. Simul. Comput. 19, 433 (1990);
        H. Avron, S. Toledo, "Randomized algorithms for estimating the trace of an implicit
        symmetric positive semi-definite matrix", J. ACM 58, 8 (2011) (Gaussian, Rademacher,
        unit-vector estimators); Rodriguez et al., arXiv:2603.04523 (2026), SI (Rademacher,
        one-hot).
    """
    s = _symmetric(a)
    if num_probes < 1:
        raise ValueError(f"num_probes must be >= 1, got {num_probes}")
    d = s.shape[0]
    diag = jnp.diagonal(s)
    if distribution == "gaussian":
        return 2.0 * jnp.sum(s**2) / num_probes
    if distribution == "rademacher":
        return 2.0 * (jnp.sum(s**2) - jnp.sum(diag**2)) / num_probes
    if distribution == "onehot":
        return (d * jnp.sum(diag**2) - jnp.sum(diag) ** 2) / num_probes
    if distribution == "orthogonal":
        if d == 1:
            return jnp.zeros((), s.dtype)
        s0 = s - jnp.eye(d, dtype=s.dtype) * jnp.sum(diag) / d
        sizes = [d] * (num_probes // d) + ([num_probes % d] if num_probes % d else [])
        block = sum(k * (d - k) for k in sizes)
        return 2.0 * d * block * jnp.sum(s0**2) / ((d + 2) * (d - 1) * num_probes**2)
    raise ValueError(f"unknown probe distribution {distribution!r}; expected one of {DISTRIBUTIONS}")
