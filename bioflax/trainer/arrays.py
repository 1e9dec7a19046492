"""Data held in memory as NumPy arrays (:class:`ArrayData`), the order in which an epoch
visits it, and its evaluation batches.

The order of an epoch is a pure function of ``(seed, epoch)`` (:func:`epoch_order`), so a
run resumed at step ``s`` sees exactly the batches it would have seen. :func:`prefetch`
makes the next chunks ready on a background thread.
"""

import dataclasses
import queue
import threading
from typing import Any, Callable, Iterable, Iterator

import numpy as np


def random_stream(seed: int, *stream: int) -> np.random.Generator:
    """The NumPy generator of one purpose (``stream``: tags and counters such as the epoch)
    for ``seed``; negative integers are folded into 64 bits, as SeedSequence wants
    non-negative ones."""
    return np.random.default_rng([int(v) & 0xFFFF_FFFF_FFFF_FFFF for v in (seed, *stream)])


def epoch_order(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The order in which epoch ``epoch`` visits the ``num_examples`` training examples: a
    permutation of ``range(num_examples)``, a pure function of ``(seed, epoch)``."""
    return random_stream(seed, epoch).permutation(num_examples)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Full batches in one epoch (the remainder is dropped)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    return num_examples // batch_size


def check_batch_size(batch_size: int, num_devices: int, *, name: str = "batch_size") -> None:
    """ValueError unless ``batch_size`` (the parameter ``name``) splits evenly over
    ``num_devices``."""
    if batch_size <= 0 or batch_size % num_devices:
        raise ValueError(
            f"{name}={batch_size} must be a positive multiple of {num_devices}, the number "
            "of devices: each device gets an equal share of the global batch. Use e.g. "
            f"{name}={max(1, round(batch_size / num_devices)) * num_devices}.")


def local_columns(batch_size: int, process_index: int, process_count: int, *,
                  name: str = "batch_size") -> slice:
    """The rows ``[p·B/P, (p+1)·B/P)`` of a global batch of ``batch_size`` that process
    ``p`` of ``P`` holds."""
    if process_count <= 0 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count="
                         f"{process_count}).")
    check_batch_size(batch_size, process_count, name=name)
    local = batch_size // process_count
    return slice(process_index * local, (process_index + 1) * local)


@dataclasses.dataclass(frozen=True)
class ArrayData:
    """Examples held in memory: ``inputs`` ``(N, ...)`` and ``targets`` ``(N, ...)``, the
    same ``N``."""

    inputs: np.ndarray
    targets: np.ndarray

    def __post_init__(self):
        if len(self.inputs) != len(self.targets):
            raise ValueError(f"inputs ({len(self.inputs)}) and targets ({len(self.targets)}) "
                             "must have the same number of examples.")

    def __len__(self) -> int:
        return len(self.inputs)

    def head(self, n: int) -> "ArrayData":
        """The first ``n`` examples."""
        return ArrayData(self.inputs[:n], self.targets[:n])

    def eval_batches(self, batch_size: int, *, process_index: int = 0,
                     process_count: int = 1) -> Iterator[dict]:
        """Every example exactly once, in order, in global batches of ``batch_size``.

        The last batch is padded to full size with zero rows; ``'mask'`` (float32) is 1 for
        a real example and 0 for padding. Yields this process's rows ``{'input', 'target',
        'mask'}`` of each global batch (rows ``[p·B/P, (p+1)·B/P)``).
        """
        columns = local_columns(batch_size, process_index, process_count,
                                name="eval_batch_size")
        return self._eval_batches(batch_size, columns)

    def _eval_batches(self, batch_size: int, columns: slice) -> Iterator[dict]:
        n = len(self)
        inputs, targets = np.asarray(self.inputs), np.asarray(self.targets)
        for start in range(0, n, batch_size):
            index = np.arange(start + columns.start, start + columns.stop)
            real = index < n
            index = np.where(real, index, 0)

            def pick(array):
                values = array[index]
                keep = real.reshape((-1,) + (1,) * (values.ndim - 1))
                return np.where(keep, values, np.zeros((), values.dtype))

            yield {"input": pick(inputs), "target": pick(targets),
                   "mask": real.astype(np.float32)}


def as_data(data: Any, *, name: str = "data",
            accepted: str = "an ArrayData or an (inputs, targets) tuple of arrays") -> ArrayData:
    """``data`` as an :class:`ArrayData`: an ArrayData as is, an ``(inputs, targets)`` tuple
    of arrays wrapped (float64 becomes float32 unless JAX runs in 64 bits, as ``jax.numpy``
    would make it). Anything else is a ValueError that names the argument ``name`` and the
    types it takes (``accepted``)."""
    if isinstance(data, ArrayData):
        return data
    if isinstance(data, tuple) and len(data) == 2:
        inputs, targets = (no_float64(np.asarray(array)) for array in data)
        if inputs.ndim and targets.ndim:
            return ArrayData(inputs=inputs, targets=targets)
        kind = "a tuple of 2 that are not both arrays of examples (N, ...)"
    elif isinstance(data, (tuple, list)):
        kind = f"a {type(data).__name__} of {len(data)}"
    else:
        kind = f"a {type(data).__name__}"
    raise ValueError(f"{name} must be {accepted}; got {kind}.")


def no_float64(array: np.ndarray) -> np.ndarray:
    """``array``, float64 made float32 unless JAX runs in 64 bits (as ``jax.numpy`` would)."""
    import jax  # pylint: disable=import-outside-toplevel  # only its config is read
    if array.dtype == np.float64 and not jax.config.jax_enable_x64:
        return array.astype(np.float32)
    return array


def prefetch(items: Iterable, transform: Callable = lambda item: item, *,
             size: int = 2) -> Iterator:
    """``transform(item)`` for each of ``items``, in order, computed on a background thread
    up to ``size`` items ahead of the consumer.

    Meant for ``transform`` = "make this chunk a global device array": the host's copies of
    the next chunks then overlap the device's work on the current one (big_vision's
    ``prefetch_iterator`` is the same idea). An exception in the thread is raised to the
    consumer; closing the iterator early stops the thread.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}.")
    ready: queue.Queue = queue.Queue(maxsize=size)
    stopped = threading.Event()
    done = object()

    def produce():
        try:
            for item in items:
                result = (transform(item), None)
                while not stopped.is_set():
                    try:
                        ready.put(result, timeout=0.1)
                        break
                    except queue.Full:
                        pass
                if stopped.is_set():
                    return
            ready.put((done, None))
        except BaseException as e:  # pylint: disable=broad-except  # re-raised below
            ready.put((done, e))

    def consume():
        thread = threading.Thread(target=produce, name="bioflax-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                result, error = ready.get()
                if result is done:
                    if error is not None:
                        raise error
                    return
                yield result
        finally:
            stopped.set()
            while thread.is_alive():  # unblock a put waiting for room, then let it end
                try:
                    ready.get(timeout=0.1)
                except queue.Empty:
                    pass

    return consume()
