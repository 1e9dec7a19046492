"""Trainer callbacks: Orbax checkpoints, early stopping, learning-rate logging."""

import logging
import os
from typing import Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from bioflax.trainer import Callback, TrainState, Trainer

logger = logging.getLogger(__name__)


def _checkpointed(state: TrainState) -> dict:
    """The parts of a TrainState that a checkpoint holds (functions are rebuilt from code)."""
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state,
            "model_state": state.model_state}


class ModelCheckpoint(Callback):
    """Orbax checkpoints of the train state in ``directory``.

    Saves when a multiple of ``every_n_steps`` is passed and at the end of ``fit``, keeps
    the newest ``max_to_keep``. Orbax writes each checkpoint to a temporary directory and
    renames it when complete, so a killed run leaves only complete checkpoints behind.
    """

    def __init__(self, directory: str, every_n_steps: int = 1000, max_to_keep: int = 3):
        if every_n_steps <= 0 or max_to_keep <= 0:
            raise ValueError("ModelCheckpoint needs every_n_steps > 0 and max_to_keep > 0, got "
                             f"{every_n_steps} and {max_to_keep}.")
        self.every_n_steps = every_n_steps
        self.manager = ocp.CheckpointManager(
            os.path.abspath(directory),
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                 enable_async_checkpointing=False))

    def restore_latest(self, state: TrainState) -> Optional[TrainState]:
        """The newest checkpoint restored into ``state``'s structure and shardings, or None."""
        step = self.manager.latest_step()
        if step is None:
            return None
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _checkpointed(state))
        restored = self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
        logger.info("Resuming from the checkpoint of step %d in %s.", step,
                    self.manager.directory)
        return state.replace(**restored)

    def save(self, state: TrainState) -> None:
        step = int(state.step)
        if step in self.manager.all_steps():
            return
        self.manager.save(step, args=ocp.args.StandardSave(_checkpointed(state)))
        self.manager.wait_until_finished()

    def on_fit_start(self, trainer: Trainer, state: TrainState) -> None:
        self._last_step = int(state.step)

    def on_train_chunk_end(self, trainer: Trainer, state: TrainState, step: int,
                           logs: Mapping[str, float]) -> None:
        if step // self.every_n_steps > self._last_step // self.every_n_steps:
            self.save(state)
        self._last_step = step

    def on_fit_end(self, trainer: Trainer, state: TrainState) -> None:
        self.save(state)
        self.manager.close()


class EarlyStopping(Callback):
    """Stops ``fit`` when ``monitor`` has not improved by ``min_delta`` for ``patience`` epochs."""

    def __init__(self, monitor: str = "val/loss", mode: str = "min", patience: int = 3,
                 min_delta: float = 0.0):
        if mode not in ("min", "max"):
            raise ValueError(f"EarlyStopping mode must be 'min' or 'max', got {mode!r}.")
        self.monitor, self.mode, self.patience, self.min_delta = monitor, mode, patience, min_delta
        self.best = np.inf if mode == "min" else -np.inf
        self.wait = 0

    def on_epoch_end(self, trainer: Trainer, state: TrainState, epoch: int,
                     logs: Mapping[str, float]) -> None:
        if self.monitor not in logs:
            raise KeyError(f"EarlyStopping monitors {self.monitor!r}, which the epoch logs "
                           f"lack; they hold {sorted(logs)}.")
        value = logs[self.monitor]
        improved = (value < self.best - self.min_delta if self.mode == "min"
                    else value > self.best + self.min_delta)
        if improved:
            self.best, self.wait = value, 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            logger.info("Early stopping after epoch %d: %s has not improved for %d epochs.",
                        epoch + 1, self.monitor, self.patience)
            trainer.should_stop = True


class LearningRateMonitor(Callback):
    """Logs ``learning_rate`` from an optimizer built with ``optax.inject_hyperparams``."""

    def on_train_chunk_end(self, trainer: Trainer, state: TrainState, step: int,
                           logs: Mapping[str, float]) -> None:
        learning_rate = getattr(state.opt_state, "hyperparams", {}).get("learning_rate")
        if learning_rate is not None:
            trainer.writer.write_scalars(step, {"learning_rate": float(learning_rate)})
