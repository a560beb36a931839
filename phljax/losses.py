"""PHL losses: per-graph energy, force, Hessian and HVP terms, masked, and the four schemes.

Per molecule with N atoms and D = 3N (eV, Angstrom):

    L_E   = (E - E_ref)^2 / s(N)          s = sqrt(N) (public code, default), 1 (paper's Alg. 1) or N
    L_F   = |F - F_ref|^2 / D
    L_H   = ||H - H_ref||_F^2 / D^2                                  (E-F-H)
    L_HVP = mean_k |H v_k - H_ref v_k|^2 / D^2, E[v v^T] = I         (E-F-HVP; unbiased for L_H)
    L     = w_E L_E + w_F L_F + w_H L_{H or HVP},  (w_E, w_F, w_H) = (1, 0.30, 0.09)

References:
    Rodriguez et al., "Projected Hessian Learning: Fast Curvature Supervision for Accurate
    Machine-Learning Interatomic Potentials", arXiv:2603.04523 (2026), Algorithm 1.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from phljax import derivatives
from phljax.data.batching import GraphBatch
from phljax.models.energy import EnergyFn
from phljax.probes import RANDOM_DISTRIBUTIONS, batch_probes, pool_draw, probe_key

__all__ = [
    "SCHEMES",
    "PROBE_MODES",
    "ENERGY_NORMS",
    "CHOICES",
    "LossConfig",
    "energy_loss",
    "force_loss",
    "hessian_loss",
    "hvp_loss",
    "reference_hvp",
    "make_loss_fn",
]

# --probe value -> scheme
SCHEMES = {"none": "E-F", "onehot": "E-F-HVP one-hot", "random": "E-F-HVP random", "full": "E-F-H"}
# new probes every step | one per molecule | the first K stored in the data | K drawn from the stored pool every step
PROBE_MODES = ("randomized", "fixed", "data", "pool")
STORED_PROBE_MODES = ("data", "pool")  # Hessian-free labels: probes and reference HVPs from the data
ENERGY_NORMS = ("sqrt_atoms", "none", "atoms")
#: The choice lists of `LossConfig`'s string fields (and so of the CLI flags of the same names).
CHOICES = {
    "probe": tuple(SCHEMES),
    "probe_dist": RANDOM_DISTRIBUTIONS,
    "probe_mode": PROBE_MODES,
    "energy_norm": ENERGY_NORMS,
}


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Scheme, weights, normalisation and probes. Defaults are the paper's."""

    probe: str = "random"  # one of SCHEMES: none | onehot | random | full
    probe_dist: str = "gaussian"  # for probe='random': gaussian | rademacher | orthogonal
    num_probes: int = 1  # K probes per molecule
    probe_mode: str = "randomized"  # randomized | fixed | data | pool (the last two: stored probes and HVPs)
    energy_weight: float = 1.0
    force_weight: float = 0.30
    hessian_weight: float = 0.09
    energy_norm: str = "sqrt_atoms"  # sqrt_atoms (public code) | none (Algorithm 1) | atoms

    def __post_init__(self):
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {list(choices)}, got {getattr(self, name)!r}")
        if self.num_probes < 1:
            raise ValueError(f"num_probes must be >= 1, got {self.num_probes}")

    @property
    def distribution(self) -> str:
        return "onehot" if self.probe == "onehot" else self.probe_dist

    @property
    def uses_hvp(self) -> bool:
        return self.probe in ("onehot", "random")

    @property
    def needs_hessian(self) -> bool:
        """Whether batches must carry reference Hessians."""
        return self.probe == "full" or (self.uses_hvp and self.probe_mode not in STORED_PROBE_MODES)


def _per_graph(x: jax.Array, batch: GraphBatch) -> jax.Array:
    """Sum node-wise values [N, ...] into graphs [G]."""
    x = x.reshape(x.shape[0], -1).sum(-1)
    return jax.ops.segment_sum(x, batch.node_graph, num_segments=batch.n_graphs)


def _dof(batch: GraphBatch) -> jax.Array:
    return 3.0 * jnp.maximum(batch.n_atoms, 1).astype(batch.positions.dtype)  # [G] D = 3N


def energy_loss(energy: jax.Array, batch: GraphBatch, norm: str = "sqrt_atoms") -> jax.Array:
    """[G] (E - E_ref)^2 / s(N), eV^2."""
    n = jnp.maximum(batch.n_atoms, 1).astype(energy.dtype)
    scale = {"sqrt_atoms": jnp.sqrt(n), "none": jnp.ones_like(n), "atoms": n}[norm]
    return (energy - batch.energy) ** 2 / scale


def force_loss(forces: jax.Array, batch: GraphBatch) -> jax.Array:
    """[G] |F - F_ref|^2 / 3N, (eV/A)^2."""
    return _per_graph((forces - batch.forces) ** 2, batch) / _dof(batch)


def hessian_loss(blocks: jax.Array, batch: GraphBatch) -> jax.Array:
    """[G] ||H - H_ref||_F^2 / (3N)^2 from local-column blocks [N, 3, A, 3], (eV/A^2)^2."""
    return _per_graph((blocks - batch.hessian) ** 2, batch) / _dof(batch) ** 2


def hvp_loss(hvps: jax.Array, reference: jax.Array, batch: GraphBatch) -> jax.Array:
    """[G] mean over K probes of |H v - H_ref v|^2 / (3N)^2; hvps, reference [K, N, 3] eV/A^2."""
    err = jnp.mean((hvps - reference) ** 2, axis=0)  # [N, 3]
    return _per_graph(err, batch) / _dof(batch) ** 2


def reference_hvp(batch: GraphBatch, probes: jax.Array) -> jax.Array:
    """H_ref v from the stored Hessian blocks: probes [K, N, 3] -> [K, N, 3] eV/A^2."""
    local = probes[:, batch.graph_nodes[batch.node_graph]]  # [K, N, A, 3] probe on each row's molecule
    return jnp.einsum("nias,knas->kni", batch.hessian, local)


def make_loss_fn(energy_fn: EnergyFn, config: LossConfig, *, hessian_chunk: int | None = None):
    """Build `loss_fn(params, batch, probe_key) -> (loss_sum, (n_graphs, metrics))`.

    `loss_sum` is the sum over real graphs of the weighted per-graph loss, so data-parallel code
    can add sums and counts across devices before dividing. `metrics` are sums over real graphs
    of each term (and squared errors), to be divided by `n_graphs`.
    """

    def loss_fn(params, batch: GraphBatch, key: jax.Array):
        if config.probe == "full":
            e, g, blocks = derivatives.batch_derivatives(
                energy_fn, params, batch, hessian_blocks=True, chunk_size=hessian_chunk
            )
            curvature = hessian_loss(blocks, batch)
        elif config.uses_hvp:
            if config.probe_mode == "data":
                v, ref = batch.hvp_probes[: config.num_probes], batch.hvps[: config.num_probes]
            elif config.probe_mode == "pool":
                v, ref = pool_draw(key, config.num_probes, batch)
            else:
                v = batch_probes(key, config.distribution, config.num_probes, batch)
                ref = reference_hvp(batch, v)
            e, g, hv = derivatives.batch_derivatives(energy_fn, params, batch, probes=v)
            curvature = hvp_loss(hv, ref, batch)
        else:
            e, g, _ = derivatives.batch_derivatives(energy_fn, params, batch)
            curvature = jnp.zeros_like(e)
        le = energy_loss(e, batch, config.energy_norm)
        lf = force_loss(-g, batch)
        per_graph = config.energy_weight * le + config.force_weight * lf + config.hessian_weight * curvature
        mask = batch.graph_mask.astype(e.dtype)
        metrics = {
            "loss": jnp.sum(per_graph * mask),
            "energy_loss": jnp.sum(le * mask),
            "force_loss": jnp.sum(lf * mask),
            "hessian_loss": jnp.sum(curvature * mask),
        }
        return metrics["loss"], (jnp.sum(mask), metrics)

    return loss_fn


def step_probe_key(seed_key: jax.Array, step: jax.Array, config: LossConfig) -> jax.Array:
    """The probe key of a training step under the configured regime."""
    return probe_key(seed_key, step, config.probe_mode in ("randomized", "pool"))
