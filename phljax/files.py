"""Crash-safe file writes, shared by the data pipelines, training, studies and benchmarks.

:func:`write_atomic` writes a temporary file next to the target, fsyncs it and renames it over the
target, so a kill leaves the old file or the new one, never half of one. :func:`locked` serialises
a read-modify-write of a file shared by processes (a study's settings, which each invocation
reads, extends and writes back).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator

__all__ = ["locked", "write_atomic"]


def write_atomic(path: str, data: str | bytes) -> None:
    """Write `data` (text or bytes) to `path` atomically (temporary file + fsync + rename)."""
    tmp = f"{path}.{os.getpid()}.tmp"  # per process: two may write the same file
    with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def locked(path: str) -> Iterator[None]:
    """Hold an exclusive advisory lock (``flock``) on ``<path>.lock`` for the block: processes that
    read, change and write back the same file take it around all three, so none loses another's
    change. It blocks until the holder leaves (or dies: the kernel frees the lock with the process);
    the ``.lock`` file stays (removing it would race a waiter). Local file systems only."""
    with open(f"{path}.lock", "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
