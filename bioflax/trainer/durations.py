"""How long a run is, in steps: resolved in one place from epochs, steps and the data size
(as big_vision's ``u.steps``), so intervals given in epochs stay right when the batch size
or the data set's size changes."""

import dataclasses
from typing import Optional

from bioflax.trainer import arrays


@dataclasses.dataclass(frozen=True)
class Durations:
    """``steps_per_epoch`` and ``total_steps`` of a run."""

    steps_per_epoch: int
    total_steps: int

    @property
    def epochs(self) -> int:
        """The epochs the run reaches, the last one partial when ``total_steps`` is not a
        multiple of ``steps_per_epoch``."""
        return -(-self.total_steps // self.steps_per_epoch)

    def ends_epoch(self, step: int) -> bool:
        """Whether the run's epoch-end work (validation, ``on_train_epoch_end``) follows ``step``:
        at the end of each epoch and at the last step, inside an epoch too."""
        return step % self.steps_per_epoch == 0 or step == self.total_steps

    def steps(self, steps: Optional[int] = None, epochs: Optional[float] = None) -> int:
        """An interval in steps: ``epochs`` (when given) times the steps per epoch, else
        ``steps``."""
        if epochs is not None:
            return max(1, round(epochs * self.steps_per_epoch))
        if steps is None:
            raise ValueError("An interval needs steps or epochs.")
        return steps


def resolve(num_examples: int, batch_size: int, *, max_epochs: Optional[int] = None,
            max_steps: Optional[int] = None,
            limit_train_batches: Optional[int] = None) -> Durations:
    """The :class:`Durations` of a run over ``num_examples`` in batches of ``batch_size``
    (the remainder dropped), at most ``limit_train_batches`` steps per epoch: ``max_epochs``
    epochs, or ``max_steps`` steps over as many epochs as they take, whichever ends first
    when both are given; one epoch when neither is."""
    steps_per_epoch = arrays.steps_per_epoch(num_examples, batch_size)
    if limit_train_batches:
        steps_per_epoch = min(steps_per_epoch, limit_train_batches)
    if steps_per_epoch == 0:
        raise ValueError(f"The training split has {num_examples} examples, fewer than one "
                         f"batch of {batch_size}: lower the batch size.")
    if max_epochs is None and max_steps is None:
        max_epochs = 1
    candidates = [steps_per_epoch * max_epochs] if max_epochs is not None else []
    candidates += [max_steps] if max_steps is not None else []
    return Durations(steps_per_epoch, min(candidates))
