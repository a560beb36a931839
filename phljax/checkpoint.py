"""Orbax checkpoints: the latest and the best training state, and the resolved config beside them.

One state dict {params, opt_state, step, key, epoch, best_val, bad_epochs, monitor} is saved with
`ocp.args.StandardSave`; on start, `restore_latest` brings back the newest one if there is one.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["Checkpointer"]


class Checkpointer:
    """Two orbax `CheckpointManager`s under `<workdir>/checkpoints/{latest,best}`."""

    def __init__(self, workdir: str):
        root = os.path.abspath(os.path.join(workdir, "checkpoints"))

        def options(name: str) -> ocp.CheckpointManagerOptions:
            # own barrier keys: with several processes the two managers' saves would share them
            multiprocessing = ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name)
            return ocp.CheckpointManagerOptions(max_to_keep=1, create=True, multiprocessing_options=multiprocessing)

        self.latest = ocp.CheckpointManager(os.path.join(root, "latest"), options=options("latest"))
        self.best = ocp.CheckpointManager(os.path.join(root, "best"), options=options("best"))

    def save(self, epoch: int, state: dict, *, is_best: bool) -> None:
        """Save `state` as epoch `epoch`; also as the best one if `is_best`."""
        state = jax.tree.map(np.asarray, state)
        self.latest.save(epoch, args=ocp.args.StandardSave(state))
        if is_best:
            self.best.save(epoch, args=ocp.args.StandardSave(state))
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def _restore(self, manager: ocp.CheckpointManager, target: dict) -> dict | None:
        step = manager.latest_step()
        if step is None:
            return None
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, jax.tree.map(np.asarray, target))
        return manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def restore_latest(self, target: dict) -> dict | None:
        """The newest saved state with `target`'s structure, or None if nothing was saved."""
        return self._restore(self.latest, target)

    def restore_best(self, target: dict) -> dict | None:
        """The best saved state (lowest validation loss), or None."""
        return self._restore(self.best, target)

    def best_params(self):
        """Parameters of the best checkpoint (or the latest if no best was kept), without a target."""
        for manager in (self.best, self.latest):
            step = manager.latest_step()
            if step is not None:
                return manager.restore(step, args=ocp.args.StandardRestore())["state"]["params"]
        raise FileNotFoundError(f"no checkpoint under {os.path.dirname(self.best.directory)}")

    def close(self) -> None:
        self.latest.close()
        self.best.close()
