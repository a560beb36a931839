"""The training step on one device: loss, gradient, optax update, over one padded batch.

The loss is a sum over real graphs divided by their count, so the step is written with explicit
(sum, count) reductions: `reduce` is the identity on one device; in `phljax.train.sharded` it
psums the count and the metrics over the mesh's data axis, while the gradient of the replicated
parameters arrives already summed by shard_map's autodiff. The sharded step then equals this one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from phljax.data.batching import GraphBatch
from phljax.losses import LossConfig, make_loss_fn, step_probe_key
from phljax.models.energy import EnergyFn

__all__ = ["TrainState", "make_train_step"]


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
