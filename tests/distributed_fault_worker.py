"""One of two processes joined by `phljax.distributed.initialize` that run cross-process collectives
until one of them is killed (tests/test_distributed_faults.py):

    python tests/distributed_fault_worker.py PORT RANK HEARTBEAT_S SHUTDOWN_S

Each process holds one CPU device (XLA_FLAGS=--xla_force_host_platform_device_count=1); every step
sums an array sharded over the 2-device mesh (an all-reduce across the processes, as a data-parallel
gradient is) and passes a `distributed.barrier`. It prints `step <n>` after each, and runs for at
most MAX_STEPS steps, so a survivor that is never stopped ends on its own instead of running forever.
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from phljax import distributed

MAX_STEPS = 20_000


def main(port: str, rank: str, heartbeat_s: str, shutdown_s: str) -> None:
    distributed.initialize(
        f"localhost:{port}", 2, int(rank), heartbeat_timeout_s=int(heartbeat_s), shutdown_timeout_s=int(shutdown_s)
    )
    mesh = distributed.make_mesh(2)
    sharding = NamedSharding(mesh, PartitionSpec(distributed.AXIS))
    total = jax.jit(jnp.sum)
    for step in range(MAX_STEPS):
        local = np.full((1,), float(jax.process_index() + step), np.float32)
        x = jax.make_array_from_process_local_data(sharding, local, (2,))
        value = float(total(x))  # all-reduce over both processes
        assert value == 2 * step + 1, (step, value)
        distributed.barrier(f"step{step}")
        print(f"step {step}", flush=True)
        time.sleep(0.01)
    print("MAX_STEPS reached without a fault", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
