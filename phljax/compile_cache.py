"""JAX's persistent compilation cache for runs: the second run of a configuration skips compiling.

XLA compiles each step program once per process (tens of seconds for the E-F-HVP and E-F-H steps
on a CPU); with the cache on, a later process with the same programs loads them from disk.
`--compile-cache` (`Config.compile_cache`): `auto` (default) uses a directory already configured
for JAX (`$JAX_COMPILATION_CACHE_DIR` or `jax.config`), else `$PHLJAX_COMPILE_CACHE`, else
`~/.cache/phljax/jax`; `off` leaves JAX as it is; anything else is the directory to use.
Every program is stored (`MIN_COMPILE_SECONDS` = 0): a run also compiles ~60 small eager programs
(parameter initialisation, data statistics), ~0.1-0.3 s each, that would otherwise cost seconds again.
"""

from __future__ import annotations

import collections
import os

import jax
from jax import monitoring

__all__ = ["enable", "resolve", "CompileLog", "MIN_COMPILE_SECONDS"]

MIN_COMPILE_SECONDS = 0.0


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


# -- what a run compiles -----------------------------------------------------------------------------

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"  # jax._src.dispatch.BACKEND_COMPILE_EVENT
_CACHE_HIT = "/jax/compilation_cache/cache_hits"
_PROGRAMS: list[tuple[str, float]] = []  # (function name, seconds) of every XLA compilation or cache load
_HITS: list[int] = [0]


def _on_duration(event: str, duration: float, **kwargs) -> None:
    if event == _BACKEND_COMPILE:
        _PROGRAMS.append((str(kwargs.get("fun_name", "?")), float(duration)))


def _on_event(event: str, **kwargs) -> None:
    if event == _CACHE_HIT:
        _HITS[0] += 1


monitoring.register_event_duration_secs_listener(_on_duration)
monitoring.register_event_listener(_on_event)


class CompileLog:
    """The XLA programs this process compiled (or loaded from the persistent cache) since creation.

    JAX reports every backend compilation through `jax.monitoring` (the duration includes a cache
    load, which is a compilation the cache answered); `summary()` counts them:
    {"programs", "seconds", "from_cache", "by_function": {name: [count, seconds]}}, the biggest first.
    """

    def __init__(self):
        self._start, self._hits = len(_PROGRAMS), _HITS[0]

    def summary(self) -> dict:
        programs = _PROGRAMS[self._start :]
        by = collections.defaultdict(lambda: [0, 0.0])
        for name, seconds in programs:
            by[name][0] += 1
            by[name][1] += seconds
        ordered = sorted(by.items(), key=lambda kv: -kv[1][1])
        return {
            "programs": len(programs),
            "seconds": round(sum(s for _, s in programs), 3),
            "from_cache": _HITS[0] - self._hits,
            "by_function": {name: [n, round(s, 3)] for name, (n, s) in ordered},
        }
