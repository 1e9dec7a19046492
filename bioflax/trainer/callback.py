"""The callback interface: hooks with the names Lightning users know, and state that a
checkpoint keeps, so a resumed run's callbacks continue where they stopped."""

import abc
from typing import Any, Mapping, Optional


class Callback:
    """Hooks called by :class:`bioflax.trainer.Trainer`; each receives the trainer.

    The names are Lightning's where they mean the same; ``on_train_chunk_end`` stands where
    Lightning has ``on_train_batch_end``, since the ``log_every_steps`` batches of a chunk
    run inside one compiled program and Python sees only their end (and mean logs)."""

    def on_fit_start(self, trainer, state) -> None: ...

    def on_train_chunk_end(self, trainer, state, step: int,
                           logs: Mapping[str, float]) -> None: ...

    def on_train_epoch_end(self, trainer, state, epoch: int,
                           logs: Mapping[str, float]) -> None:
        """After the epoch's validation, as Lightning's: ``logs`` holds its ``train/`` and
        ``val/`` metrics."""

    def on_fit_end(self, trainer, state) -> None: ...

    def on_exception(self, trainer, error: BaseException) -> None:
        """``fit`` ends with ``error`` (divergence, an interruption, a bug)."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of this callback (JSON-serialisable)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state``, a :meth:`state_dict` of an earlier session."""


class CheckpointCallback(Callback, abc.ABC):
    """A callback that saves the train state and the callbacks' states; ``fit`` resumes
    from it and runs it after the other callbacks (as Lightning does), so a checkpoint holds
    their state after the step it saves."""

    @abc.abstractmethod
    def restore_latest(self, state) -> Optional[tuple[Any, dict[str, Any]]]:
        """``(state, callback_states)`` of the newest checkpoint, or None."""
