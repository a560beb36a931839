"""The run's key schedule: every random stream of a training run, derived from `Config.seed`.

One place, so that a reader can see what a seed fixes and a new stream cannot collide with an old
one. The streams (kept as they were when runs were first published, so a seed reproduces the same
model):

    init      jax.random.PRNGKey(seed)        model parameters (`init_params`)
    probes    jax.random.PRNGKey(seed + 1)    training probes; per step `fold_in(probes, step)` in
                                              the randomized regime, the same key in the fixed one,
                                              then `fold_in(., molecule index)` (`phljax.probes`)
    val       jax.random.PRNGKey(seed + 2)    the validation loss's probes (the same every epoch,
                                              so epochs are compared on the same probes)
    shuffle   seed * 100003 + epoch           numpy seed of an epoch's batch order

The data split has its own seed, `Config.split_seed`, so a split can be held fixed while the
initialisation varies (the study sets both to the same value: same seed, same split).
"""

from __future__ import annotations

from typing import NamedTuple

import jax

__all__ = ["RunKeys", "run_keys", "shuffle_seed"]


class RunKeys(NamedTuple):
    init: jax.Array  # [2] uint32 PRNGKey: model parameters
    probes: jax.Array  # [2] uint32 PRNGKey: training probes (TrainState.key)
    val: jax.Array  # [2] uint32 PRNGKey: validation probes


def run_keys(seed: int) -> RunKeys:
    """The PRNG keys of a run with `Config.seed = seed`."""
    return RunKeys(jax.random.PRNGKey(seed), jax.random.PRNGKey(seed + 1), jax.random.PRNGKey(seed + 2))


def shuffle_seed(seed: int, epoch: int) -> int:
    """The numpy seed of epoch `epoch`'s batch order (0-based epoch)."""
    return seed * 100003 + epoch
