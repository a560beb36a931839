"""The optimizer, built in one place from optax pieces."""

from __future__ import annotations

import optax

__all__ = ["make_optimizer", "learning_rate_scale", "nonfinite_steps"]

_NEVER = 2**30  # apply_if_finite gives up and applies a non-finite update after this many in a row: never


def make_optimizer(
    learning_rate: float,
    *,
    weight_decay: float = 0.0,
    grad_clip: float = 10.0,
    lr_factor: float = 0.5,
    lr_patience: int = 15,
    min_lr_scale: float = 1e-3,
    steps_per_epoch: int = 1,
) -> optax.GradientTransformationExtraArgs:
    """Skip non-finite updates (clip -> AdamW -> reduce-on-plateau).

    `optax.apply_if_finite` drops any update whose gradient holds a NaN or inf (a bad label, an
    exploding step) and counts it; it never gives up and applies one. The run loop stops after
    `Config.max_nonfinite_steps` in a row (`nonfinite_steps`).

    The plateau transform reads `value=` passed to `update` (the train step passes the previous
    epoch's validation loss) and averages it over `steps_per_epoch` updates, so `lr_patience`
    counts epochs; the rate never falls below `min_lr_scale * learning_rate`.
    """
    chain = optax.chain(
        optax.clip_by_global_norm(grad_clip),
        optax.adamw(learning_rate, weight_decay=weight_decay),
        optax.contrib.reduce_on_plateau(
            factor=lr_factor, patience=lr_patience, accumulation_size=steps_per_epoch, min_scale=min_lr_scale
        ),
    )
    return optax.apply_if_finite(chain, max_consecutive_errors=_NEVER)


def learning_rate_scale(opt_state) -> float:
    """Current plateau scale of the learning rate (1.0 until the first reduction).

    Found by name (`optax.tree.get`), so a reordered or extended chain still finds it.
    """
    return float(optax.tree.get(opt_state, "scale"))


def nonfinite_steps(opt_state) -> tuple[int, int]:
    """(skipped non-finite updates in all, skipped in a row up to now), from `apply_if_finite`'s state."""
    return int(optax.tree.get(opt_state, "total_notfinite")), int(optax.tree.get(opt_state, "notfinite_count"))
