"""Training data for the chunk program, in the order :func:`bioflax.trainer.arrays.epoch_order`
gives, so a run resumed at step ``s`` sees exactly the batches an uninterrupted one would.

A :class:`DataSource` yields, per chunk of steps, ``(data, xs, n)``: ``data`` passed to the
compiled program as is, ``xs`` scanned over (one slice per step), ``n`` steps; inside the
program ``source.batch(data, x, placement)`` is one step's global batch.
"""

import abc
from typing import Any, Iterator, Optional, Sequence

import jax
import numpy as np

from bioflax.trainer.arrays import ArrayData, epoch_order
from bioflax.trainer.placement import Placement


class DataSource(abc.ABC):
    """A training split (anything with a length) and how its batches reach the device."""

    supports_seeds = False  # can feed several vmapped seeds, each in its own order

    def __init__(self, split):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    @abc.abstractmethod
    def sample_input(self) -> np.ndarray:
        """One example, batched: what the model is initialised on."""

    def sample_target(self) -> Optional[np.ndarray]:
        """One example's targets, batched (what a task's default metrics follow): the
        split's ``head(1).targets``; None for a split without ``head``."""
        head = getattr(self.split, "head", None)
        return None if head is None else np.asarray(head(1).targets)

    @abc.abstractmethod
    def chunks(self, placement: Placement, batch_size: int, seeds: Sequence[int], epoch: int,
               start: int, stop: int, chunk_steps: int) -> Iterator[tuple[Any, Any, int]]:
        """Steps ``[start, stop)`` of ``epoch``, ``chunk_steps`` at a time (fewer at the end)."""

    @staticmethod
    @abc.abstractmethod
    def batch(data, x, placement: Placement):
        """One step's global batch, inside the compiled program."""


class InMemory(DataSource):
    """The split held on the device (replicated); the program gathers each batch by index.
    Fast for data sets that fit; feeds several seeds at once."""

    supports_seeds = True

    def __init__(self, split: ArrayData):
        super().__init__(split)
        self._on_device: dict = {}

    def sample_input(self) -> np.ndarray:
        return np.asarray(self.split.inputs[:1])

    def _placed(self, placement: Placement):
        key = id(placement.mesh)
        if key not in self._on_device:
            self._on_device = {key: placement.to_global(
                {"input": self.split.inputs, "target": self.split.targets},
                placement.replicated)}
        return self._on_device[key]

    def chunks(self, placement, batch_size, seeds, epoch, start, stop, chunk_steps):
        orders = np.stack([epoch_order(seed, epoch, len(self)) for seed in seeds],
                          axis=1)  # (examples, seeds)
        for first in range(start, stop, chunk_steps):
            n = min(chunk_steps, stop - first)
            indices = orders[first * batch_size:(first + n) * batch_size].reshape(
                n, batch_size, len(seeds)).transpose(0, 2, 1).astype(np.int32)
            if len(seeds) == 1:
                indices = indices[:, 0]
            yield self._placed(placement), placement.to_global(indices, placement.replicated), n

    @staticmethod
    def batch(data, x, placement):
        batch = jax.tree.map(lambda a: a[x], data)
        return jax.lax.with_sharding_constraint(batch, placement.batch)
