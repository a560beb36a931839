"""Orbax checkpoints: the latest and the best training states, with a fallback for each.

One state dict {params, opt_state, step, key, epoch, best_val, bad_epochs, monitor} is saved with
`ocp.args.StandardSave`. Each manager keeps the `KEEP` newest steps, so a damaged newest one (a
kill during the write, a truncated or overwritten file) leaves the one before. On restore each
candidate is validated: orbax must read it against the expected structure, it must hold no NaN
and finite parameters; a candidate that fails is named in a warning and the next older one is
tried. A work directory whose checkpoints are all unreadable stops the run with `CheckpointError`
saying how to proceed: a run is never silently restarted from scratch. A state with a NaN (or
non-finite parameters) is never written.
"""

from __future__ import annotations

import os
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["Checkpointer", "CheckpointError", "KEEP"]

KEEP = 2  # steps kept per manager: the newest and one to fall back to


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was expected, or a state that must not be saved."""


def _nonfinite(tree) -> list[str]:
    """Paths of the leaves that must not be saved or restored: NaN anywhere, and inf in the
    parameters (elsewhere inf is a legitimate sentinel, e.g. the best loss before the first epoch)."""
    bad = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        x = np.asarray(leaf)
        if not np.issubdtype(x.dtype, np.floating):
            continue
        name = jax.tree_util.keystr(path)
        in_params = "['params']" in name
        if np.any(np.isnan(x)) or (in_params and not np.all(np.isfinite(x))):
            bad.append(name)
    return bad


class Checkpointer:
    """Two orbax `CheckpointManager`s under `<workdir>/checkpoints/{latest,best}`."""

    def __init__(self, workdir: str):
        self.root = os.path.abspath(os.path.join(workdir, "checkpoints"))

        def options(name: str) -> ocp.CheckpointManagerOptions:
            # own barrier keys: with several processes the two managers' saves would share them
            multiprocessing = ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name)
            return ocp.CheckpointManagerOptions(max_to_keep=KEEP, create=True, multiprocessing_options=multiprocessing)

        self.latest = ocp.CheckpointManager(os.path.join(self.root, "latest"), options=options("latest"))
        self.best = ocp.CheckpointManager(os.path.join(self.root, "best"), options=options("best"))

    def save(self, epoch: int, state: dict, *, is_best: bool) -> None:
        """Save `state` as epoch `epoch`; also as the best one if `is_best`.

        Raises:
            CheckpointError: if any array of `state` holds a NaN (nothing is written), or the write
                fails (disk full, read-only): the previous checkpoint is left as it was.
        """
        state = jax.tree.map(np.asarray, state)
        bad = _nonfinite(state)
        if bad:
            raise CheckpointError(f"epoch {epoch}: refusing to save a state with non-finite values in {bad[:5]}")
        try:
            self.latest.save(epoch, args=ocp.args.StandardSave(state))
            if is_best:
                self.best.save(epoch, args=ocp.args.StandardSave(state))
            self.latest.wait_until_finished()
            self.best.wait_until_finished()
        except OSError as e:  # disk full, read-only, quota: orbax wrote to a temporary folder first
            kept = self.latest.latest_step()
            raise CheckpointError(
                f"epoch {epoch}: saving a checkpoint under {self.root} failed ({e.strerror or e}); the previous "
                f"checkpoint ({'epoch ' + str(kept) if kept is not None else 'none'}) is intact: free space or fix "
                "permissions, then run the same command again to resume"
            ) from e

    def save_best(self, epoch: int, state: dict) -> None:
        """Save `state` as the best one of epoch `epoch` (a resumed run whose kill fell between the
        latest and the best save of its best epoch completes that save)."""
        self.best.save(epoch, args=ocp.args.StandardSave(jax.tree.map(np.asarray, state)))
        self.best.wait_until_finished()

    def _restore(self, manager: ocp.CheckpointManager, target: dict | None) -> tuple[int, dict] | None:
        """(step, state) of the newest valid step of `manager`, None if it holds none at all."""
        steps = sorted(manager.all_steps(), reverse=True)
        if not steps:
            return None
        abstract = None
        if target is not None:
            abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, jax.tree.map(np.asarray, target))
        problems = []
        for step in steps:
            try:
                args = ocp.args.StandardRestore(abstract) if abstract is not None else ocp.args.StandardRestore()
                state = manager.restore(step, args=args)
            except Exception as e:  # noqa: BLE001 (orbax and tensorstore raise many types for a damaged file)
                problems.append(f"step {step}: unreadable ({type(e).__name__}: {str(e)[:200]})")
                continue
            bad = _nonfinite(state)
            if bad:
                problems.append(f"step {step}: non-finite values in {bad[:3]}")
                continue
            if problems:
                warnings.warn(
                    f"{manager.directory}: fell back to step {step}; " + "; ".join(problems),
                    RuntimeWarning,
                    stacklevel=3,
                )
            return step, state
        raise CheckpointError(
            f"{manager.directory}: no usable checkpoint among steps {steps}: " + "; ".join(problems) + ". "
            f"To start this run again from scratch, move {self.root} away (or use a new --workdir); "
            "to keep what is there, restore a copy of the directory from a backup"
        )

    def restore_latest(self, target: dict) -> dict | None:
        """The newest valid saved state with `target`'s structure, or None if nothing was saved.

        Raises:
            CheckpointError: when steps exist and none of them is usable.
        """
        found = self._restore(self.latest, target)
        return None if found is None else found[1]

    def restore_best(self, target: dict) -> dict | None:
        """The best valid saved state (lowest validation loss), or None."""
        found = self._restore(self.best, target)
        return None if found is None else found[1]

    def best_params(self):
        """Parameters of the best checkpoint (or the latest if no best was kept), without a target.

        Raises:
            FileNotFoundError: when the work directory holds no checkpoint.
            CheckpointError: when it holds some and none is usable.
        """
        for manager in (self.best, self.latest):
            found = self._restore(manager, None)
            if found is not None:
                return found[1]["state"]["params"]
        raise FileNotFoundError(f"no checkpoint under {self.root}")

    def close(self) -> None:
        self.latest.close()
        self.best.close()
