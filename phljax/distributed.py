"""The distributed runtime and the device mesh: `jax.distributed`, processes, devices, slots.

Imports nothing from phljax, so every layer above (the sharded step, the run loop, the CLI) can use
it. `initialize` is called once, by the entry point (`experiments/run.py`, or a user's script),
before anything touches a JAX device; the rest only reads what it set up.

Several processes (one per host, or one per GPU) run the same program in lock step: the mesh lists
the devices process by process, so process p holds a contiguous block of the data axis
(`local_slots`). Files are written by process 0 (`is_main_process`).
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh

__all__ = [
    "AXIS",
    "initialize",
    "requested",
    "is_main_process",
    "barrier",
    "resolve_devices",
    "make_mesh",
    "local_slots",
]

AXIS = "data"

#: Seconds without a heartbeat after which a process counts as dead (killed, frozen, its node lost):
#: jax then aborts every other process with an error (jax's default: 100).
HEARTBEAT_TIMEOUT_S = 60
#: Seconds a process that ends waits at exit for the others to end too, e.g. for one that is alive
#: but stuck (jax's default: 300).
SHUTDOWN_TIMEOUT_S = 60

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


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S,
    shutdown_timeout_s: int = SHUTDOWN_TIMEOUT_S,
) -> bool:
    """Join this process to a multi-process run with `jax.distributed.initialize`, if one is asked for.

    Each argument falls back to an environment variable ($JAX_COORDINATOR_ADDRESS,
    $JAX_NUM_PROCESSES, $JAX_PROCESS_ID); inside an `srun` step of several tasks, what is still
    unset comes from SLURM (jax's own detection: the first node of the step and a port derived
    from the job id, $SLURM_NTASKS, $SLURM_PROCID; each task sees the GPU $SLURM_LOCALID). With
    none of these, or one process, it does nothing. Safe to call twice. Must run before anything
    touches a JAX device (CPU processes exchange collectives over gloo, this JAX's default).

    When a process dies or freezes (killed, out of memory, its node or network lost), the others do
    not hang: a collective with a killed process fails at once (gloo: connection reset), and once it
    has sent no heartbeat for `heartbeat_timeout_s`, jax aborts every other process ("Terminating
    process because the JAX distributed service detected fatal errors"), wherever it waits: in a
    collective with a frozen process, or at exit (tests/test_distributed_faults.py). Rerun them all
    to resume from the checkpoints. A process that is alive but stuck still sends heartbeats.

    Args:
        coordinator_address: "host:port" of process 0, reachable from every process.
        num_processes: total number of processes.
        process_id: this process's rank, 0 .. num_processes - 1.
        heartbeat_timeout_s: seconds without a heartbeat after which a process counts as dead.
        shutdown_timeout_s: seconds a process that ends waits at exit for the others.

    Returns:
        True when the run spans several processes.

    Raises:
        ValueError: when a multi-process run is asked for with settings missing or inconsistent.
        RuntimeError: (from jax) when JAX's backend was already initialised.
    """
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    settings = _settings(coordinator_address, num_processes, process_id)
    if settings is None:
        return False  # a single process
    jax.distributed.initialize(
        *settings, heartbeat_timeout_seconds=heartbeat_timeout_s, shutdown_timeout_seconds=shutdown_timeout_s
    )
    return jax.process_count() > 1


def requested(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Whether these settings (with the environment, as in `initialize`) ask for several processes."""
    return _settings(coordinator_address, num_processes, process_id) is not None


def _settings(address, num_processes, process_id) -> tuple | None:
    """(address, num_processes, process_id) for `jax.distributed.initialize`, or None for one process."""
    address = address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    if num_processes is None:
        num_processes = _env_int("JAX_NUM_PROCESSES")
    if process_id is None:
        process_id = _env_int("JAX_PROCESS_ID")
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"--num-processes must be >= 1, got {num_processes}")
    slurm = _in_slurm_step()
    if not slurm and address is None and num_processes in (None, 1) and process_id in (None, 0):
        return None
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
    return address, num_processes, process_id


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
