"""The training step on a 1-D device mesh (`jax.shard_map` with `NamedSharding`), on one host or
several, and the global batches it consumes.

A global batch of `batch_size` molecules is split evenly into one padded sub-batch per device and
stacked on a leading `data` axis. Parameters and optimizer state are replicated; each device
computes the *sums* of its graphs' losses and gradients, which are added over the mesh (a `psum`;
for the gradient, the transpose of the parameters' broadcast to every device) and the step divides
by the global count of real graphs, so padding graphs weigh zero and the update is the
single-device update (`phljax.train.step`) on the same global batch. Probes are keyed by each
molecule's global index (see `phljax.probes`), so the result does not depend on how the batch is
split.

With several processes (`phljax.distributed`), process p holds a contiguous block of the data axis
(`local_slots`), builds only those sub-batches, and `jax.make_array_from_process_local_data`
assembles the global sharded batch. Every process sees the same replicated parameters and metrics.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from phljax.data.batching import BatchBudget, GraphBatch, make_batch
from phljax.data.records import Molecule
from phljax.distributed import AXIS, local_slots, make_mesh
from phljax.losses import LossConfig, make_loss_fn
from phljax.models.energy import EnergyFn
from phljax.train.step import make_train_step

__all__ = ["stack", "global_batches", "data_parallel_steps"]


def stack(batches: Sequence[GraphBatch]) -> GraphBatch:
    """Stack per-device batches on a new leading axis."""
    return jax.tree.map(lambda *xs: np.stack(xs), *batches)


def global_batches(
    molecules: Sequence[Molecule],
    index: np.ndarray,  # [n] int global molecule indices of the split (key probes, name records)
    budget: BatchBudget,
    *,
    batch_size: int,
    n_devices: int,
    cutoff: float,
    shuffle_seed: int | None = None,
    dtype=np.float32,
) -> Iterator[GraphBatch]:
    """Global batches of `batch_size` molecules of `index`, split evenly into one padded batch per
    device; yields this process's sub-batches stacked on a leading [len(local_slots)] axis.

    Args:
        molecules: every record of the run; `index` selects the split.
        budget: one device's padded sizes (`batch_size // n_devices` molecules).
        shuffle_seed: numpy seed of the order (None: in index order).
    """
    index = np.asarray(index)
    if shuffle_seed is not None:
        index = index[np.random.default_rng(shuffle_seed).permutation(len(index))]
    per = batch_size // n_devices
    slots = local_slots(n_devices)
    for start in range(0, len(index), batch_size):
        chunk = index[start : start + batch_size]
        parts = [chunk[d * per : (d + 1) * per] for d in slots]
        yield stack([make_batch([molecules[i] for i in part], budget, cutoff, part, dtype) for part in parts])


def data_parallel_steps(
    energy_fn: EnergyFn,
    loss_config: LossConfig,
    optimizer: optax.GradientTransformationExtraArgs,
    n_devices: int,
    *,
    val_key: jax.Array,
    hessian_chunk: int | None = None,
):
    """Sharded train and validation steps over `n_devices` devices (all processes together).

    Batches are this process's sub-batches stacked on a leading axis, `[len(local_slots), ...]`
    (what `global_batches` yields); on one process that is the whole global batch.

    Args:
        val_key: the validation probes' key (`phljax.train.seeds`), the same every epoch.

    Returns:
        train_step(state, local_batch, monitor) -> (state, metrics): one optimizer step on the
            global batch; `state` replicated (donated), metrics global means, replicated;
        val_step(params, local_batch) -> (loss_sum, count) over the global batch, replicated;
        put(tree) -> the tree replicated over the mesh (every process must pass the same values).
    """
    n = n_devices
    mesh = make_mesh(n)
    replicated = NamedSharding(mesh, P())
    sharded = NamedSharding(mesh, P(AXIS))
    psum = lambda tree: jax.lax.psum(tree, AXIS)

    def reduce(sums):
        # With check_vma, the gradient with respect to the replicated parameters comes out of
        # `jax.grad` already summed over the mesh: the transpose of their implicit broadcast to
        # every device is a psum. A second psum would scale it by n_devices.
        grads, count, metrics = sums
        return grads, psum(count), psum(metrics)

    step = make_train_step(energy_fn, loss_config, optimizer, hessian_chunk=hessian_chunk, reduce=reduce)
    loss_fn = make_loss_fn(energy_fn, loss_config, hessian_chunk=hessian_chunk)

    def local(batch):  # [1, ...] block of one device -> that device's batch
        return jax.tree.map(lambda x: x[0], batch)

    def train_local(state, batch, monitor):
        return step(state, local(batch), monitor)

    def val_local(params, batch):
        loss, (count, _) = loss_fn(params, local(batch), val_key)
        return psum((loss, count))

    train = jax.jit(
        jax.shard_map(train_local, mesh=mesh, in_specs=(P(), P(AXIS), P()), out_specs=(P(), P()), check_vma=True),
        donate_argnums=0,
    )
    val = jax.jit(jax.shard_map(val_local, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=P()))

    def shard(batch: GraphBatch) -> GraphBatch:  # this process's [n_local, ...] -> global [n, ...]
        def one(x):
            x = np.asarray(x)
            if x.shape[0] * jax.process_count() != n:
                raise ValueError(
                    f"{x.shape[0]} stacked sub-batches on this process; the mesh needs {n // jax.process_count()}"
                )
            return jax.make_array_from_process_local_data(sharded, x, (n, *x.shape[1:]))

        return jax.tree.map(one, batch)

    def put(tree):
        def one(x):
            x = np.asarray(x)
            return jax.make_array_from_process_local_data(replicated, x, x.shape)

        return jax.tree.map(one, tree)

    def train_step(state, batch, monitor):
        return train(state, shard(batch), put(monitor))

    def val_step(params, batch):
        return val(params, shard(batch))

    return train_step, val_step, put
