"""Jitted training and evaluation steps over padded batches.

The loss is a sum over real graphs divided by their count, so the step is written with explicit
(sum, count) reductions: `reduce` is the identity on one device; in `phljax.parallel` it psums the
count and the metrics over the mesh's data axis, while the gradient of the replicated parameters
arrives already summed by shard_map's autodiff. The sharded step then equals the single-device one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from phljax import derivatives
from phljax.data.batching import GraphBatch
from phljax.losses import LossConfig, make_loss_fn, step_probe_key
from phljax.models.energy import EnergyFn

__all__ = ["TrainState", "make_train_step", "make_eval_step", "ERROR_KEYS"]


class TrainState(NamedTuple):
    params: object  # model parameters (pytree)
    opt_state: optax.OptState
    step: jax.Array  # [] int32 optimizer steps taken
    key: jax.Array  # [2] uint32 probe seed key (PRNGKey)


def _identity(tree):
    return tree


def make_train_step(
    energy_fn: EnergyFn,
    loss_config: LossConfig,
    optimizer: optax.GradientTransformationExtraArgs,
    *,
    hessian_chunk: int | None = None,
    reduce: Callable = _identity,
):
    """`step(state, batch, monitor) -> (state, metrics)`; `monitor` = last validation loss."""
    loss_fn = make_loss_fn(energy_fn, loss_config, hessian_chunk=hessian_chunk)

    def step(state: TrainState, batch: GraphBatch, monitor: jax.Array):
        key = step_probe_key(state.key, state.step, loss_config)
        grads, (count, metrics) = jax.grad(loss_fn, has_aux=True)(state.params, batch, key)
        grads, count, metrics = reduce((grads, count, metrics))
        count = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params, value=monitor)
        params = optax.apply_updates(state.params, updates)
        metrics = {k: v / count for k, v in metrics.items()}
        return TrainState(params, opt_state, state.step + 1, state.key), metrics

    return step


ERROR_KEYS = ("energy", "forces", "hessian")


def make_eval_step(energy_fn: EnergyFn, *, with_hessian: bool, hessian_chunk: int | None = None):
    """`eval_step(params, batch) -> sums` of absolute and squared errors and counts.

    Energy errors count molecules, force errors Cartesian components, Hessian errors entries of
    each molecule's [3N, 3N] Hessian (model Hessian from 3A HVPs of the batch).
    """

    def eval_step(params, batch: GraphBatch):
        def total(r):
            e = energy_fn(params, batch._replace(positions=r))
            return e.sum(), e

        if with_hessian:
            (_, e), g, blocks = derivatives.value_grad_and_block_hessian(
                total, batch.positions, batch.graph_nodes, has_aux=True, chunk_size=hessian_chunk
            )
        else:
            (_, e), g = jax.value_and_grad(total, has_aux=True)(batch.positions)
        gmask = batch.graph_mask.astype(e.dtype)
        nmask = batch.node_mask.astype(e.dtype)[:, None]
        de = (e - batch.energy) * gmask
        df = (-g - batch.forces) * nmask
        out = {
            "energy_abs": jnp.sum(jnp.abs(de)),
            "energy_sq": jnp.sum(de**2),
            "energy_n": jnp.sum(gmask),
            "forces_abs": jnp.sum(jnp.abs(df)),
            "forces_sq": jnp.sum(df**2),
            "forces_n": 3 * jnp.sum(nmask),
        }
        if with_hessian:
            max_atoms = batch.graph_nodes.shape[1]
            real_col = jnp.arange(max_atoms)[None, :] < batch.n_atoms[batch.node_graph][:, None]  # [N, A]
            hmask = (real_col & batch.node_mask[:, None]).astype(e.dtype)[:, None, :, None]
            dh = (blocks - batch.hessian) * hmask
            out.update(
                hessian_abs=jnp.sum(jnp.abs(dh)),
                hessian_sq=jnp.sum(dh**2),
                hessian_n=9 * jnp.sum(hmask),
            )
        return out

    return eval_step
