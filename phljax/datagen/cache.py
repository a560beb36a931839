"""Crash-safe cache files of the data-generation pipelines.

Every finished calculation is written the moment it finishes, atomically (temporary file, fsync,
rename), so a killed run loses at most the calculation in flight and a restart recomputes nothing
that is already on disk.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

from phljax.files import write_atomic

__all__ = ["save_npz", "save_json", "load_npz", "load_json"]


def save_npz(path: str, **arrays) -> None:
    """Write an ``.npz`` atomically (temporary file + fsync + rename)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_atomic(path, buf.getvalue())


def save_json(path: str, obj: dict) -> None:
    """Write JSON atomically (numpy scalars become floats)."""
    write_atomic(path, json.dumps(obj, indent=1, default=_jsonable))


def _jsonable(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.integer | np.bool_):
        return x.item()
    return float(x)


def load_npz(path: str) -> dict[str, Any]:
    """Read an ``.npz`` fully into a dict of arrays (no pickles)."""
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def load_json(path: str) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)
