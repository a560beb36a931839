"""Crash-safe file writes, shared by the data pipelines, training, studies and benchmarks.

:func:`write_atomic` writes a temporary file next to the target, fsyncs it and renames it over the
target, so a kill leaves the old file or the new one, never half of one.
"""

from __future__ import annotations

import os

__all__ = ["write_atomic"]


def write_atomic(path: str, data: str | bytes) -> None:
    """Write `data` (text or bytes) to `path` atomically (temporary file + fsync + rename)."""
    tmp = f"{path}.{os.getpid()}.tmp"  # per process: two may write the same file
    with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
