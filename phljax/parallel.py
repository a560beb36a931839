"""Data-parallel training over a 1-D device mesh (`jax.shard_map` with `NamedSharding`).

A global batch is split into one padded sub-batch per device and stacked on a leading `data`
axis. Parameters and optimizer state are replicated; each device computes the *sums* of its
graphs' losses and gradients, a `psum` adds them over the mesh and the step divides by the global
count of real graphs, so padding graphs weigh zero and the update is the single-device update on
the same global batch. Probes are keyed by each molecule's global index (see `phljax.probes`),
so the result does not depend on how the batch is split.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from phljax.data.batching import GraphBatch
from phljax.losses import make_loss_fn
from phljax.train.step import make_train_step

__all__ = ["AXIS", "make_mesh", "resolve_devices", "stack", "data_parallel_steps"]

AXIS = "data"


def resolve_devices(requested: int, batch_size: int) -> int:
    """Number of devices to use (0: all local devices); the global batch must split evenly."""
    available = jax.local_device_count()
    n = requested or available
    if n < 1 or n > available:
        raise ValueError(f"--devices {requested}: {available} local device(s) available")
    if batch_size % n:
        raise ValueError(f"--batch-size {batch_size} does not split evenly over {n} devices")
    return n


def make_mesh(n_devices: int) -> jax.sharding.Mesh:
    """A 1-D mesh over the first `n_devices` devices, axis name 'data'."""
    return jax.make_mesh((n_devices,), (AXIS,), devices=jax.devices()[:n_devices])


def stack(batches: list[GraphBatch]) -> GraphBatch:
    """Stack per-device batches on a new leading axis."""
    return jax.tree.map(lambda *xs: np.stack(xs), *batches)


def data_parallel_steps(run, optimizer, devices: int = 0, *, hessian_chunk: int | None = None):
    """Sharded train and validation steps for `run` over `devices` devices.

    Returns:
        train_step(state, stacked_batch, monitor) -> (state, metrics),
        val_step(params, stacked_batch) -> (loss_sum, count),
        put(tree) -> the tree replicated over the mesh.
    """
    n = run.n_devices
    mesh = make_mesh(n)
    replicated = NamedSharding(mesh, P())
    sharded = NamedSharding(mesh, P(AXIS))
    psum = lambda tree: jax.lax.psum(tree, AXIS)
    step = make_train_step(run.energy_fn, run.loss_config, optimizer, hessian_chunk=hessian_chunk, reduce=psum)
    loss_fn = make_loss_fn(run.energy_fn, run.loss_config, hessian_chunk=hessian_chunk)
    val_key = jax.random.PRNGKey(run.config.seed + 2)

    def local(batch):
        return jax.tree.map(lambda x: x[0], batch)

    def train_local(state, batch, monitor):
        return step(state, local(batch), monitor)

    def val_local(params, batch):
        loss, (count, _) = loss_fn(params, local(batch), val_key)
        return psum((loss, count))

    train = jax.jit(
        jax.shard_map(train_local, mesh=mesh, in_specs=(P(), P(AXIS), P()), out_specs=(P(), P())),
        donate_argnums=0,
    )
    val = jax.jit(jax.shard_map(val_local, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=P()))

    def train_step(state, batch, monitor):
        return train(state, jax.device_put(batch, sharded), jax.device_put(monitor, replicated))

    def val_step(params, batch):
        return val(params, jax.device_put(batch, sharded))

    def put(tree):
        return jax.device_put(tree, replicated)

    return train_step, val_step, put
