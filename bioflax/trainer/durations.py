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

    def steps(self, steps: Optional[int] = None, epochs: Optional[float] = None) -> int:
        """An interval in steps: ``epochs`` (when given) times the steps per epoch, else
        ``steps``."""
        if epochs is not None:
            return max(1, round(epochs * self.steps_per_epoch))
        if steps is None:
            raise ValueError("An interval needs steps or epochs.")
        return steps


def resolve(num_examples: int, batch_size: int, *, max_epochs: int,
            max_steps: Optional[int] = None,
            limit_train_batches: Optional[int] = None) -> Durations:
    """The :class:`Durations` of ``max_epochs`` over ``num_examples`` in batches of
    ``batch_size`` (the remainder dropped), at most ``limit_train_batches`` steps per epoch
    and ``max_steps`` in all."""
    steps_per_epoch = arrays.steps_per_epoch(num_examples, batch_size)
    if limit_train_batches:
        steps_per_epoch = min(steps_per_epoch, limit_train_batches)
    if steps_per_epoch == 0:
        raise ValueError(f"The training split has {num_examples} examples, fewer than one "
                         f"batch of {batch_size}: lower the batch size.")
    total_steps = steps_per_epoch * max_epochs
    if max_steps is not None:
        total_steps = min(total_steps, max_steps)
    return Durations(steps_per_epoch, total_steps)
