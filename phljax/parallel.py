"""Data-parallel training over a 1-D device mesh (`jax.shard_map` with `NamedSharding`), on one
host or several (`jax.distributed`).

A global batch of `batch_size` molecules is split evenly into one padded sub-batch per device and
stacked on a leading `data` axis. Parameters and optimizer state are replicated; each device
computes the *sums* of its graphs' losses and gradients, which are added over the mesh (a `psum`;
for the gradient, the transpose of the parameters' broadcast to every device) and the step divides
by the global count of real graphs, so padding graphs weigh zero and the update is the
single-device update on the same global batch. Probes are keyed by each molecule's global
index (see `phljax.probes`), so the result does not depend on how the batch is split.

Several processes (one per host, or one per GPU) run the same program in lock step: the mesh lists
the devices process by process, so process p holds a contiguous block of the data axis
(`local_slots`), builds only those sub-batches, and `jax.make_array_from_process_local_data`
assembles the global sharded batch. Every process sees the same replicated parameters and metrics;
files are written by process 0 (`is_main_process`), checkpoints by all (orbax coordinates them).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from phljax.data.batching import GraphBatch
from phljax.losses import make_loss_fn
from phljax.train.step import make_train_step

__all__ = [
    "AXIS",
    "initialize_distributed",
    "is_main_process",
    "barrier",
    "resolve_devices",
    "make_mesh",
    "local_slots",
    "stack",
    "data_parallel_steps",
]

AXIS = "data"

_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"${name} must be an integer, got {value!r}") from None


def _in_slurm_step() -> bool:
    """Inside an `srun` step of several tasks (what `jax.distributed.initialize()` auto-detects)."""
    return all(v in os.environ for v in _SLURM_VARS) and (_env_int("SLURM_NTASKS") or 1) > 1


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Join this process to a multi-process run with `jax.distributed.initialize`, if one is asked for.

    Each argument falls back to an environment variable ($JAX_COORDINATOR_ADDRESS,
    $JAX_NUM_PROCESSES, $JAX_PROCESS_ID); inside an `srun` step of several tasks, what is still
    unset comes from SLURM (jax's own detection: the first node of the step and a port derived
    from the job id, $SLURM_NTASKS, $SLURM_PROCID; each task sees the GPU $SLURM_LOCALID). With
    none of these, or one process, it does nothing. Safe to call twice. Must run before anything
    touches a JAX device (CPU processes exchange collectives over gloo, this JAX's default).

    Args:
        coordinator_address: "host:port" of process 0, reachable from every process.
        num_processes: total number of processes.
        process_id: this process's rank, 0 .. num_processes - 1.

    Returns:
        True when the run spans several processes.

    Raises:
        ValueError: when a multi-process run is asked for with settings missing or inconsistent.
        RuntimeError: (from jax) when JAX's backend was already initialised.
    """
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    if num_processes is None:
        num_processes = _env_int("JAX_NUM_PROCESSES")
    if process_id is None:
        process_id = _env_int("JAX_PROCESS_ID")
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"--num-processes must be >= 1, got {num_processes}")
    slurm = _in_slurm_step()
    if not slurm and address is None and num_processes in (None, 1) and process_id in (None, 0):
        return False  # a single process
    if not slurm:
        missing = [
            flag
            for flag, value in (
                ("--coordinator-address", address),
                ("--num-processes", num_processes),
                ("--process-id", process_id),
            )
            if value is None
        ]
        if missing:
            raise ValueError(
                f"a multi-process run needs {', '.join(missing)} (or $JAX_COORDINATOR_ADDRESS, "
                f"$JAX_NUM_PROCESSES, $JAX_PROCESS_ID), or an srun step of several tasks; got "
                f"coordinator_address={address!r}, num_processes={num_processes}, process_id={process_id}"
            )
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id {process_id} must lie in [0, {num_processes}) (--num-processes)")
    jax.distributed.initialize(address, num_processes, process_id)
    return jax.process_count() > 1


def is_main_process() -> bool:
    """Whether this is process 0, the one that writes files and prints."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier `name` (nothing to wait for on one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def resolve_devices(requested: int, batch_size: int) -> int:
    """The number of devices in the mesh: `requested` per process (0: all local ones) x processes.

    Raises:
        ValueError: if a process has fewer devices than requested, or the global batch of
            `batch_size` molecules does not split evenly over the mesh.
    """
    available = jax.local_device_count()
    per_process = requested or available
    if not 1 <= per_process <= available:
        raise ValueError(f"--devices {requested}: this process has {available} local device(s)")
    processes = jax.process_count()
    n = per_process * processes
    if batch_size % n:
        over = f"{n} devices" + (f" ({processes} processes x {per_process})" if processes > 1 else "")
        raise ValueError(
            f"--batch-size {batch_size} does not split evenly over {over}: use a multiple of {n}, "
            f"e.g. --batch-size {max(n, batch_size // n * n)}, or change --devices"
        )
    return n


def _per_process(n_devices: int) -> int:
    processes = jax.process_count()
    if n_devices < processes or n_devices % processes:
        raise ValueError(f"{n_devices} devices do not split evenly over {processes} processes")
    return n_devices // processes


def make_mesh(n_devices: int) -> Mesh:
    """A 1-D mesh, axis 'data', over the first `n_devices / processes` local devices of each
    process, listed process by process (process p holds data slots `local_slots(n_devices)`)."""
    per = _per_process(n_devices)
    devices = []
    for p in range(jax.process_count()):
        local = sorted(jax.local_devices(process_index=p), key=lambda d: d.id)
        if len(local) < per:
            raise ValueError(f"process {p} has {len(local)} device(s), the mesh needs {per} on each")
        devices += local[:per]
    return Mesh(np.array(devices), (AXIS,), axis_types=(AxisType.Explicit,))


def local_slots(n_devices: int) -> range:
    """Positions on the mesh's data axis held by this process's devices."""
    per = _per_process(n_devices)
    return range(jax.process_index() * per, (jax.process_index() + 1) * per)


def stack(batches: Sequence[GraphBatch]) -> GraphBatch:
    """Stack per-device batches on a new leading axis."""
    return jax.tree.map(lambda *xs: np.stack(xs), *batches)


def data_parallel_steps(run, optimizer, *, hessian_chunk: int | None = None):
    """Sharded train and validation steps over `run.n_devices` devices (all processes together).

    Batches are this process's sub-batches stacked on a leading axis, `[len(run.local_slots), ...]`
    (what `Run.global_batches` yields); on one process that is the whole global batch.

    Returns:
        train_step(state, local_batch, monitor) -> (state, metrics): one optimizer step on the
            global batch; `state` replicated (donated), metrics global means, replicated;
        val_step(params, local_batch) -> (loss_sum, count) over the global batch, replicated;
        put(tree) -> the tree replicated over the mesh (every process must pass the same values).
    """
    n = run.n_devices
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

    step = make_train_step(run.energy_fn, run.loss_config, optimizer, hessian_chunk=hessian_chunk, reduce=reduce)
    loss_fn = make_loss_fn(run.energy_fn, run.loss_config, hessian_chunk=hessian_chunk)
    val_key = jax.random.PRNGKey(run.config.seed + 2)

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
