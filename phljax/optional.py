"""Optional third-party programs that change JAX's global state on import, imported without it.

`import sella` (2.6) turns on `jax_enable_x64` for the whole process, points JAX's compilation cache
at its own directory and sets `JAX_PLATFORMS=cpu` when it is unset: a process that also runs a
model on a GPU would silently fall back to the CPU and to float64. `import_sella` undoes all three;
run Sella's own JAX code inside `jax.enable_x64(True)` instead. Every phljax module that needs
Sella (the reaction pipeline, the TS search) imports it through here.
"""

from __future__ import annotations

import os
import sys

import jax

__all__ = ["import_sella"]

_SELLA_TOUCHES = ("jax_enable_x64", "jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")


def import_sella():
    """`sella`, imported with JAX's configuration and `$JAX_PLATFORMS` left as they were.

    Raises:
        ImportError: when Sella is not installed (`pip install phljax[data]`).
    """
    if "sella" in sys.modules:
        return sys.modules["sella"]
    saved = {k: getattr(jax.config, k) for k in _SELLA_TOUCHES}
    platforms = os.environ.get("JAX_PLATFORMS")
    import sella  # noqa: PLC0415 (optional: the `data` extra; imported here only, for its side effects)

    for k, v in saved.items():
        jax.config.update(k, v)
    if platforms is None:
        os.environ.pop("JAX_PLATFORMS", None)
    else:
        os.environ["JAX_PLATFORMS"] = platforms
    return sella
