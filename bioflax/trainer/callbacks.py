"""Trainer callbacks: Orbax checkpoints, early stopping, learning-rate logging."""

import contextlib
import gc
import logging
import os
import sys
import time
from typing import Any, Mapping, Optional

import flax
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import traverse_util

from bioflax import distributed
from bioflax.errors import CheckpointError
from bioflax.trainer.callback import Callback, CheckpointCallback
from bioflax.trainer.loop import Trainer
from bioflax.trainer.task import TrainState

logger = logging.getLogger(__name__)


def _checkpointed(state: TrainState) -> dict:
    """The parts of a TrainState that a checkpoint holds (functions are rebuilt from code)."""
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state,
            "model_state": state.model_state, "rng": state.rng}


@contextlib.contextmanager
def _reading_quietly():
    """Holds back, while it runs, what Orbax and its I/O report of failing reads: Orbax's
    log records (absl's logger), asyncio's ("Task exception was never retrieved") and the
    "Event loop is closed" tracebacks of the reads that a failed one left running on
    TensorStore's threads. It yields a function for the caller to call after a failure; on
    leaving, after a failure or a held-back traceback, it waits until none has come for
    0.2 s (at most 2 s). The caller says in one line what it made of a failure."""
    loggers = [logging.getLogger(name) for name in ("absl", "orbax", "asyncio")]
    levels = [each.level for each in loggers]
    previous_hook = sys.unraisablehook
    held_back: list[float] = []

    def hook(unraisable):
        if (isinstance(unraisable.exc_value, RuntimeError)
                and "Event loop is closed" in str(unraisable.exc_value)):
            held_back.append(time.monotonic())
        else:
            previous_hook(unraisable)

    for each in loggers:
        each.setLevel(logging.CRITICAL)
    sys.unraisablehook = hook
    try:
        yield lambda: held_back.append(time.monotonic())
    finally:
        deadline = time.monotonic() + 2.0
        while held_back and time.monotonic() < min(held_back[-1] + 0.2, deadline):
            time.sleep(0.05)
        gc.collect()  # a failed read's futures report themselves when collected
        sys.unraisablehook = previous_hook
        for each, level in zip(loggers, levels):
            each.setLevel(level)


class ModelCheckpoint(CheckpointCallback):
    """Orbax checkpoints in ``directory``: the train state (item ``state``) and every
    callback's ``state_dict()`` (item ``callbacks``, JSON).

    Saves at the end of the first chunk that passes a multiple of the interval (at the
    epoch's end when that chunk ends an epoch, after the other callbacks have seen it) and
    at the end of ``fit``, keeps the newest ``max_to_keep``. The interval is one of
    ``every_n_steps`` or ``every_n_epochs`` (may be fractional; rounded to whole steps of
    the run when ``fit`` starts); with neither, every epoch, as Lightning's
    ModelCheckpoint. Orbax writes each checkpoint to a temporary directory and renames it
    when complete, so a killed run leaves only complete checkpoints behind.
    """

    def __init__(self, directory: str, every_n_steps: Optional[int] = None,
                 every_n_epochs: Optional[float] = None, max_to_keep: int = 3):
        if every_n_steps is not None and every_n_epochs is not None:
            raise ValueError("ModelCheckpoint takes every_n_steps or every_n_epochs, not "
                             f"both (got {every_n_steps} and {every_n_epochs}).")
        for name, value in (("every_n_steps", every_n_steps),
                            ("every_n_epochs", every_n_epochs), ("max_to_keep", max_to_keep)):
            if value is not None and value <= 0:
                raise ValueError(f"ModelCheckpoint needs {name} > 0, got {value}.")
        self.every_n_steps = every_n_steps
        self.every_n_epochs = (1 if every_n_steps is None and every_n_epochs is None
                               else every_n_epochs)
        self._interval: Optional[int] = None  # in steps, resolved by on_fit_start
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            item_names=("state", "callbacks"),
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "callbacks": ocp.JsonCheckpointHandler()},
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                 cleanup_tmp_directories=True,
                                                 enable_async_checkpointing=False))
        self._last_step = 0
        self._pending = False

    def restore_latest(self, state: TrainState) -> Optional[tuple[TrainState, dict[str, Any]]]:
        """``(state, callback_states)`` of the newest readable checkpoint, restored into
        ``state``'s structure and shardings.

        None when there is no checkpoint. An unreadable checkpoint (truncated or missing
        files) is moved aside to ``STEP.unreadable`` with a warning and the next older one
        is tried; a checkpoint of a differently shaped model raises CheckpointError.
        """
        target = _checkpointed(state)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        steps = sorted(self.manager.all_steps(), reverse=True)
        with _reading_quietly() as read_failed:
            for step in steps:
                restored, error = None, None
                try:
                    metadata = self.manager.item_metadata(step)
                    saved = getattr(metadata.get("state") if metadata else None, "tree", None)
                    if not isinstance(saved, Mapping):
                        raise FileNotFoundError("its metadata is missing")
                except Exception as caught:  # pylint: disable=broad-except
                    error = caught
                if error is None:
                    _check_same_model(saved, target, step, self.directory)
                    try:
                        restored = self.manager.restore(step, args=ocp.args.Composite(
                            state=ocp.args.StandardRestore(abstract),
                            callbacks=ocp.args.JsonRestore()))
                    except Exception as caught:  # pylint: disable=broad-except
                        error = caught
                # Every process must take the same decision: unreadable if unreadable to any.
                if distributed.any_process(error is not None):
                    read_failed()
                    self._set_aside(step, error or RuntimeError("another process could not "
                                                                "read it"))
                    continue
                logger.info("Resuming from the checkpoint of step %d in %s.", step,
                            self.directory)
                return state.replace(**restored["state"]), dict(restored["callbacks"] or {})
        if steps:
            raise CheckpointError(
                f"None of the checkpoints in {self.directory} (steps {sorted(steps)}) is "
                "readable; they were moved aside to STEP.unreadable. Training again with "
                "this directory starts from scratch; or use a new checkpoint directory.")
        return None

    def _set_aside(self, step: int, error: Exception) -> None:
        """Renames checkpoint ``step`` to ``STEP.unreadable``: process 0 does, the others
        wait for it (every process must call this)."""
        if jax.process_index() == 0:
            path = os.path.join(self.directory, str(step))
            aside = f"{path}.unreadable"
            suffix = 1
            while os.path.exists(aside):
                aside, suffix = f"{path}.unreadable{suffix}", suffix + 1
            os.rename(path, aside)
            logger.warning("The checkpoint of step %d in %s is unreadable (%s: %s); moved it "
                           "to %s and trying the next older one.", step, self.directory,
                           type(error).__name__, str(error)[:300], aside)
        distributed.barrier(f"checkpoint {step} set aside")
        self.manager.reload()

    def save(self, state: TrainState, callback_states: Mapping[str, Any]) -> None:
        step = int(state.step)
        if step in self.manager.all_steps():
            return
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(_checkpointed(state)),
            callbacks=ocp.args.JsonSave(dict(callback_states))))
        self.manager.wait_until_finished()

    def on_fit_start(self, trainer: Trainer, state: TrainState) -> None:
        self._interval = trainer.durations.steps(self.every_n_steps, self.every_n_epochs)
        self._last_step = int(state.step)
        self._pending = False

    def on_train_chunk_end(self, trainer: Trainer, state: TrainState, step: int,
                           logs: Mapping[str, float]) -> None:
        if step // self._interval > self._last_step // self._interval:
            self._pending = True
        self._last_step = step
        if self._pending and not trainer.durations.ends_epoch(step):
            self._pending = False
            self.save(state, trainer.callback_states())

    def on_train_epoch_end(self, trainer: Trainer, state: TrainState, epoch: int,
                           logs: Mapping[str, float]) -> None:
        if self._pending:
            self._pending = False
            self.save(state, trainer.callback_states())

    def on_fit_end(self, trainer: Trainer, state: TrainState) -> None:
        self.save(state, trainer.callback_states())
        self.manager.close()


def _check_same_model(saved, target, step: int, directory: str) -> None:
    """CheckpointError naming the first parameter whose shape or presence differs."""
    saved = traverse_util.flatten_dict(saved, sep="/")
    wanted = traverse_util.flatten_dict(flax.core.unfreeze(target), sep="/")
    for name in sorted(set(saved) | set(wanted), key=lambda n: (not n.startswith("params/"), n)):
        if not name.startswith(("params/", "model_state/")):
            continue
        have = tuple(saved[name].shape) if name in saved else None
        want = tuple(wanted[name].shape) if name in wanted else None
        if have != want:
            raise CheckpointError(
                f"The checkpoint of step {step} in {directory} is of a different model: "
                f"{name} is {'absent' if have is None else have} there and "
                f"{'absent' if want is None else want} in this model. Use a new checkpoint "
                "directory for this model, or the model it was trained with.")


class EarlyStopping(Callback):
    """Stops ``fit`` when ``monitor`` has not improved by ``min_delta`` for ``patience`` epochs
    (None: never for that reason), or at once when it reaches ``stopping_threshold`` (at or
    above it in mode 'max', at or below in 'min'), as Lightning's EarlyStopping does.

    With ``smoothing = s > 0`` both rules read the running average
    ``m ← s·m + (1 − s)·value`` (``m`` starts at the first epoch's value) instead of the
    epoch's value; Nøkland's reference code stops on such an average of the training
    error with ``s = 0.75``. Its best value, patience count, average and whether it stopped
    are its ``state_dict()``, kept in checkpoints: a resumed run stops where an
    uninterrupted one does, and a stopped run stays stopped.

    ``fit`` raises ValueError before its first step when the epoch logs will not hold
    ``monitor`` (:class:`~bioflax.trainer.loop.LogNames`): a ``val/`` name without ``val``
    data, or a ``train/`` or ``val/`` name that is not one of the task's metrics. Other
    names are checked only when the task has no step metrics (whose names are known only
    when they run).
    """

    def __init__(self, monitor: str = "val/loss", mode: str = "min",
                 patience: Optional[int] = 3, min_delta: float = 0.0,
                 stopping_threshold: Optional[float] = None, smoothing: float = 0.0):
        if mode not in ("min", "max"):
            raise ValueError(f"EarlyStopping mode {mode!r} is unknown: choose one of "
                             "['min', 'max'].")
        if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)) or not (
                0.0 <= smoothing < 1.0):
            raise ValueError(f"EarlyStopping smoothing must lie in [0, 1), got {smoothing!r}.")
        self.monitor, self.mode, self.patience, self.min_delta = monitor, mode, patience, min_delta
        self.stopping_threshold, self.smoothing = stopping_threshold, smoothing
        self.best = np.inf if mode == "min" else -np.inf
        self.wait = 0
        self.average: Optional[float] = None
        self.stopped = False

    def state_dict(self) -> dict[str, Any]:
        return {"best": float(self.best), "wait": self.wait, "average": self.average,
                "stopped": self.stopped}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best, self.wait = float(state["best"]), int(state["wait"])
        self.average, self.stopped = state["average"], bool(state["stopped"])

    def on_fit_start(self, trainer: Trainer, state: TrainState) -> None:
        log_names = getattr(trainer, "log_names", None)
        problem = log_names.missing(self.monitor) if log_names is not None else None
        if problem is not None:
            raise ValueError(f"EarlyStopping monitors {self.monitor!r}, {problem}")
        if self.stopped:
            trainer.should_stop = True

    def on_train_epoch_end(self, trainer: Trainer, state: TrainState, epoch: int,
                           logs: Mapping[str, float]) -> None:
        if self.monitor not in logs:
            raise KeyError(f"EarlyStopping monitors {self.monitor!r}, which the epoch logs "
                           f"lack; they hold {sorted(logs)}.")
        value = logs[self.monitor]
        if self.average is not None:
            value = self.smoothing * self.average + (1.0 - self.smoothing) * value
        self.average = float(value)
        threshold = self.stopping_threshold
        if threshold is not None and (value >= threshold if self.mode == "max"
                                      else value <= threshold):
            logger.info("Stopping after epoch %d: %s = %g reached the threshold %g.",
                        epoch + 1, self.monitor, value, threshold)
            trainer.should_stop = self.stopped = True
            return
        improved = (value < self.best - self.min_delta if self.mode == "min"
                    else value > self.best + self.min_delta)
        if improved:
            self.best, self.wait = value, 0
            return
        self.wait += 1
        if self.patience is not None and self.wait >= self.patience:
            logger.info("Early stopping after epoch %d: %s has not improved for %d epochs.",
                        epoch + 1, self.monitor, self.patience)
            trainer.should_stop = self.stopped = True


class LearningRateMonitor(Callback):
    """Logs ``learning_rate`` from an optimizer built with ``optax.inject_hyperparams``,
    wherever it sits in the optimizer's state (the first one's, with parameter groups)."""

    def on_train_chunk_end(self, trainer: Trainer, state: TrainState, step: int,
                           logs: Mapping[str, float]) -> None:
        found = optax.tree_utils.tree_get_all_with_path(state.opt_state, "hyperparams")
        learning_rate = found[0][1].get("learning_rate") if found else None
        if learning_rate is not None:
            # The same for every seed when several are trained at once.
            trainer.writer.write_scalars(
                step, {"learning_rate": float(np.ravel(learning_rate)[0])})
