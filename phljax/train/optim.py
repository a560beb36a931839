"""The optimizer, built in one place from optax pieces."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

__all__ = ["make_optimizer", "learning_rate_scale", "nonfinite_steps", "continue_warmup", "replay_schedule"]

_NEVER = 2**30  # apply_if_finite gives up and applies a non-finite update after this many in a row: never
FIRST_MONITOR = 1e30  # the plateau transform's value in a run's first epoch (no validation loss yet)


def make_optimizer(
    learning_rate: float,
    *,
    weight_decay: float = 0.0,
    grad_clip: float = 10.0,
    lr_factor: float = 0.5,
    lr_patience: int = 15,
    min_lr_scale: float = 1e-3,
    steps_per_epoch: int = 1,
    plateau_warmup: int = 0,
) -> optax.GradientTransformationExtraArgs:
    """Skip non-finite updates (clip -> AdamW -> reduce-on-plateau).

    `optax.apply_if_finite` drops any update whose gradient holds a NaN or inf (a bad label, an
    exploding step) and counts it; it never gives up and applies one. The run loop stops after
    `Config.max_nonfinite_steps` in a row (`nonfinite_steps`).

    The plateau transform reads `value=` passed to `update` (the train step passes the previous
    epoch's validation loss) and averages it over `steps_per_epoch` updates, so `lr_patience`
    counts epochs; the rate never falls below `min_lr_scale * learning_rate`. For the first
    `plateau_warmup` epochs the plateau transform is held in its cooldown (optax's own: it tracks
    the best value but counts no epoch without improvement), so a loss plateau at the start of
    training, or a lucky early validation value, cannot cut the rate.
    """
    chain = optax.chain(
        optax.clip_by_global_norm(grad_clip),
        optax.adamw(learning_rate, weight_decay=weight_decay),
        optax.contrib.reduce_on_plateau(
            factor=lr_factor, patience=lr_patience, accumulation_size=steps_per_epoch, min_scale=min_lr_scale
        ),
    )
    tx = optax.apply_if_finite(chain, max_consecutive_errors=_NEVER)
    if not plateau_warmup:
        return tx

    def init(params):
        return continue_warmup(tx.init(params), 0, plateau_warmup)

    return optax.GradientTransformationExtraArgs(init, tx.update)


def continue_warmup(opt_state, epochs_done: int, plateau_warmup: int):
    """The optimizer state of a run resumed after `epochs_done` epochs, as `plateau_warmup` makes it.

    Before the warm-up's end the plateau transform is put back in its cooldown for the epochs left
    (a run checkpointed without a warm-up, or with a shorter one, continues as if it had had this
    one: same rate, same best value); after its end the state is left as it is.

    Raises:
        ValueError: the run already cut its rate before the warm-up's end: no state of this warm-up
            leads there (start it afresh).
    """
    if epochs_done >= plateau_warmup:
        return opt_state
    if learning_rate_scale(opt_state) < 1.0:
        raise ValueError(
            f"the learning rate was already cut (scale {learning_rate_scale(opt_state):g}) after {epochs_done} "
            f"epochs, inside a plateau warm-up of {plateau_warmup}"
        )
    return optax.tree.set(
        opt_state,
        cooldown_count=jnp.asarray(plateau_warmup - epochs_done, jnp.int32),
        plateau_count=jnp.asarray(0, jnp.int32),
    )


def learning_rate_scale(opt_state) -> float:
    """Current plateau scale of the learning rate (1.0 until the first reduction).

    Found by name (`optax.tree.get`), so a reordered or extended chain still finds it.
    """
    return float(optax.tree.get(opt_state, "scale"))


def nonfinite_steps(opt_state) -> tuple[int, int]:
    """(skipped non-finite updates in all, skipped in a row up to now), from `apply_if_finite`'s state."""
    return int(optax.tree.get(opt_state, "total_notfinite")), int(optax.tree.get(opt_state, "notfinite_count"))


def replay_schedule(
    val_losses: Sequence[float],
    *,
    lr_factor: float = 0.5,
    lr_patience: int = 15,
    min_lr_scale: float = 1e-3,
    plateau_warmup: int = 0,
    first_monitor: float = FIRST_MONITOR,
) -> list[float]:
    """The learning-rate scale after each epoch that the plateau schedule of :func:`make_optimizer`
    gives a run whose epochs ended with these validation losses (each epoch's updates see the
    previous epoch's loss, the first ``first_monitor``, as the run loop passes them). Replays a
    logged run under other schedule settings (e.g. a warm-up) without training it."""
    tx = make_optimizer(1.0, lr_factor=lr_factor, lr_patience=lr_patience, min_lr_scale=min_lr_scale,
                        plateau_warmup=plateau_warmup)  # fmt: skip
    params = {"w": jnp.zeros(1)}
    step = jax.jit(lambda state, value: tx.update(params, state, params, value=value)[1])
    state, out = tx.init(params), []
    for monitor in [first_monitor, *val_losses[:-1]]:
        state = step(state, jnp.asarray(monitor, jnp.float32))
        out.append(learning_rate_scale(state))
    return out
