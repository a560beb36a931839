"""JAX's persistent compilation cache for runs: the second run of a configuration skips compiling.

XLA compiles each step program once per process (tens of seconds for the E-F-HVP and E-F-H steps
on a CPU); with the cache on, a later process with the same programs loads them from disk.
`--compile-cache` (`Config.compile_cache`): `auto` (default) uses a directory already configured
for JAX (`$JAX_COMPILATION_CACHE_DIR` or `jax.config`), else `$PHLJAX_COMPILE_CACHE`, else
`~/.cache/phljax/jax`; `off` leaves JAX as it is; anything else is the directory to use.
Programs that take at least `MIN_COMPILE_SECONDS` to compile are stored.
"""

from __future__ import annotations

import os

import jax

__all__ = ["enable", "resolve", "MIN_COMPILE_SECONDS"]

MIN_COMPILE_SECONDS = 0.5


def resolve(setting: str) -> str | None:
    """The cache directory `setting` names (None: off)."""
    if setting == "off":
        return None
    if setting != "auto":
        return os.path.abspath(os.path.expanduser(setting))
    configured = jax.config.jax_compilation_cache_dir or os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if configured:
        return configured
    return os.environ.get("PHLJAX_COMPILE_CACHE") or os.path.expanduser(os.path.join("~", ".cache", "phljax", "jax"))


def enable(setting: str) -> str | None:
    """Turn the persistent cache on as `setting` says; returns the directory (None: off).

    Raises:
        OSError: when the directory cannot be created.
    """
    directory = resolve(setting)
    if directory is None:
        return None
    if jax.config.jax_compilation_cache_dir != directory:
        os.makedirs(directory, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", directory)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    return directory
