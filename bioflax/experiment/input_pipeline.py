"""The experiment's splits and their ``tf.data`` batches.

A :class:`Split` (arrays in memory, a :class:`bioflax.trainer.ArrayData` that may carry a
training augmentation) and a :class:`StreamedSplit` (a TFDS split read from its files as it
is used) answer the same three questions: ``hold_out`` (a validation part),
``train_batches`` (an epoch's batches through tf.data) and ``eval_batches``. Both give
batch ``i`` of epoch ``e`` the examples :func:`bioflax.trainer.arrays.epoch_order` gives
the trainer's in-memory path, so a run resumed at step ``s`` sees exactly the batches it
would have seen. :class:`TFData` feeds them to the trainer.
"""

import dataclasses
import math
from typing import Any, Iterator, Optional

import jax
import numpy as np

from bioflax.trainer import DataSource
from bioflax.trainer.arrays import (ArrayData, epoch_order, local_columns, prefetch,
                                    random_stream, steps_per_epoch)

_SHUFFLE_STREAM = 0x736875  # "shu": the random stream of a streamed split's shuffles
_VAL_SPLIT_STREAM = 0x76616C  # "val": the random stream of an in-memory hold-out
# Examples a streamed training split shuffles among (after shuffling its files).
_SHUFFLE_BUFFER = 10_000
# TensorFlow kernels need tensor data aligned to this many bytes (Allocator::kAllocatorAlignment).
_TF_ALIGNMENT = 64


def tensorflow():
    """TensorFlow, imported on first use and kept off the accelerators that JAX uses."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    try:
        tf.config.set_visible_devices([], "GPU")
    except (RuntimeError, ValueError):  # TF already initialised its devices, or has none.
        pass
    return tf


def tf_aligned(array) -> bool:
    """Whether ``array`` is a C-contiguous NumPy array whose data starts on a TF-aligned
    address, so that TensorFlow can share it instead of copying it."""
    return (isinstance(array, np.ndarray) and array.flags.c_contiguous
            and array.ctypes.data % _TF_ALIGNMENT == 0)


def aligned(array) -> np.ndarray:
    """``array`` itself when TF-aligned, else a C-contiguous copy that is."""
    if tf_aligned(array):
        return array
    array = np.asarray(array)
    buffer = np.empty(array.nbytes + _TF_ALIGNMENT, dtype=np.uint8)
    offset = -buffer.ctypes.data % _TF_ALIGNMENT
    out = buffer[offset:offset + array.nbytes].view(array.dtype).reshape(array.shape)
    out[...] = array
    return out


def _empty_split_error(fraction: float, n: int) -> ValueError:
    return ValueError(f"val_split={fraction} of {n} training examples leaves an empty "
                      "training or validation split.")


def _check_steps(n: int, batch_size: int, start_step: int, num_steps: Optional[int],
                 chunk: int) -> int:
    """The step after the last one :meth:`Split.train_batches` gives."""
    steps = steps_per_epoch(n, batch_size)
    if steps == 0:
        raise ValueError(f"batch_size={batch_size} exceeds the {n} training examples: an "
                         "epoch would have no step.")
    if not 0 <= start_step <= steps:
        raise ValueError(f"start_step={start_step} must be in [0, {steps}] (steps per epoch).")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}.")
    stop = steps if num_steps is None else start_step + num_steps
    if not start_step <= stop <= steps:
        raise ValueError(f"num_steps={num_steps} must be in [0, {steps - start_step}] "
                         f"(steps left in the epoch after start_step={start_step}).")
    return stop


@dataclasses.dataclass(frozen=True)
class Split(ArrayData):
    """One split held in memory: ``inputs`` float32 ``(N, *input_shape)``, preprocessed, or
    int32 tokens ``(N, T)`` (language modelling); ``targets`` int32 ``(N,)``
    (classification), float32 ``(N, num_outputs)`` (regression) or int32 ``(N, T)`` (the
    next tokens); the training split's ``augmentation``, if any (applied by
    :meth:`train_batches` only). Every dtype is kept as given."""

    augmentation: Optional[Any] = None

    def __post_init__(self):
        # Aligned, contiguous storage lets the tf.data pipelines share it without a copy.
        for field in ("inputs", "targets"):
            object.__setattr__(self, field, aligned(getattr(self, field)))
        super().__post_init__()

    def head(self, n: int) -> "Split":
        return Split(self.inputs[:n], self.targets[:n])

    def hold_out(self, fraction: float, seed: int) -> tuple["Split", "Split"]:
        """``(train, validation)``: ``round(fraction · N)`` examples chosen by ``seed`` held
        out; both parts keep the original relative order."""
        n = len(self)
        num_val = int(round(fraction * n))
        if num_val in (0, n):
            raise _empty_split_error(fraction, n)
        perm = random_stream(seed, _VAL_SPLIT_STREAM).permutation(n)
        val_idx, train_idx = np.sort(perm[:num_val]), np.sort(perm[num_val:])
        take = lambda idx: Split(self.inputs[idx], self.targets[idx])
        return take(train_idx), take(val_idx)

    def train_batches(self, batch_size: int, seed: int, epoch: int, *, start_step: int = 0,
                      chunk: int = 1, process_index: int = 0, process_count: int = 1,
                      num_steps: Optional[int] = None) -> Iterator[dict]:
        """This process's training batches of one epoch, ``chunk`` steps at a time.

        Global batch ``i`` is ``epoch_order(seed, epoch, N)[i·B:(i+1)·B]`` (the last partial
        batch is dropped); the first ``start_step`` batches are skipped, and only
        ``num_steps`` batches are given when set (default: to the end of the epoch); this
        process keeps rows ``[p·B/P, (p+1)·B/P)`` of each; the augmentation, if any, is
        applied to every example as its ``draws(seed, epoch, N)`` say. Yields
        ``{'input': (k, B/P, *input_shape), 'target': (k, B/P, ...)}`` NumPy arrays,
        ``k == chunk`` except possibly for the epoch's last chunk.
        """
        n = len(self)
        stop = _check_steps(n, batch_size, start_step, num_steps, chunk)
        columns = local_columns(batch_size, process_index, process_count)
        steps = steps_per_epoch(n, batch_size)
        order = epoch_order(seed, epoch, n)[:steps * batch_size]
        local_idx = order.reshape(steps, batch_size)[start_step:stop, columns]
        tf = tensorflow()
        inputs, targets = _to_tensor(self.inputs), _to_tensor(self.targets)
        augmentation = self.augmentation
        if augmentation is not None:
            draws = tf.constant(augmentation.draws(seed, epoch, n))

        def gather(idx):
            x = tf.gather(inputs, idx)
            if augmentation is not None:
                x = augmentation.apply(x, tf.gather(draws, idx))
            return {"input": x, "target": tf.gather(targets, idx)}

        ds = tf.data.Dataset.from_tensor_slices(local_idx.astype(np.int64))
        ds = ds.batch(chunk, drop_remainder=False)
        ds = ds.map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.prefetch(tf.data.AUTOTUNE)
        return _untuned(ds).as_numpy_iterator()


def _to_tensor(array: np.ndarray):
    """``array`` as a CPU tensor. A TF-aligned array (as :class:`Split` keeps them) is
    shared through DLPack, so that a new pipeline per epoch does not copy the data set;
    the split must then not be modified while a pipeline over it runs. Any other array is
    copied."""
    tf = tensorflow()
    if array.size and tf_aligned(array):
        try:
            return tf.experimental.dlpack.from_dlpack(array.__dlpack__())
        except Exception:  # pylint: disable=broad-except
            pass
    return tf.convert_to_tensor(array)


def _untuned(ds):
    """``ds`` without tf.data's default graph rewrites and its autotuner: the rewrites walk
    a graph that holds the whole in-memory split each epoch, and the autotuner's thread
    takes CPU from the training step it feeds."""
    options = tensorflow().data.Options()
    options.experimental_optimization.apply_default_optimizations = False
    options.autotune.enabled = False
    return ds.with_options(options)


@dataclasses.dataclass(frozen=True)
class StreamedSplit:
    """A TFDS split that is read from its files as it is used, never held whole in memory
    (``data.streaming``); each process reads only its own shard
    (``tfds.split_for_jax_process``). ``len`` is the number of examples the processes read
    together in an epoch (every process the same number)."""

    builder: object  # a prepared tfds.core.DatasetBuilder
    split: str  # a TFDS split, possibly a slice ("train[:54000]")
    mean: np.ndarray  # per channel
    std: np.ndarray
    input_shape: tuple[int, ...]
    augmentation: Optional[Any] = None  # applied by train_batches only

    def __len__(self) -> int:
        count = jax.process_count()
        return self.builder.info.splits[self.split].num_examples // count * count

    def hold_out(self, fraction: float, seed: int) -> tuple["StreamedSplit", "StreamedSplit"]:
        """The first ``1 − fraction`` of the split for training, the rest for validation
        (a fixed cut: a streamed split has no random hold-out; ``seed`` is unused)."""
        del seed
        n = self.builder.info.splits[self.split].num_examples
        cut = n - int(round(fraction * n))
        if cut in (0, n):
            raise _empty_split_error(fraction, n)
        return (dataclasses.replace(self, split=f"{self.split}[:{cut}]"),
                dataclasses.replace(self, split=f"{self.split}[{cut}:]"))

    def head(self, n: int) -> Split:
        """The first ``n`` examples of the split in memory (for plots and shapes)."""
        import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
        ds = self._examples(self.split).take(n).batch(n).map(self._preprocess)
        images, labels = next(iter(tfds.as_numpy(ds)))
        return Split(images, labels)

    def _examples(self, split: str, **read):
        """``split``'s examples as a tf.data set of ``(uint8 image, label)``."""
        return self.builder.as_dataset(split=split, as_supervised=True, **read)

    def _preprocess(self, images, labels):
        """Batched uint8 images → normalised float32 inputs; int32 labels (the same
        arithmetic as the in-memory path, so the same values)."""
        tf = tensorflow()
        x = (tf.cast(images, tf.float32) / 255.0 - self.mean) / self.std
        return (tf.reshape(x, [-1, *self.input_shape]), tf.cast(labels, tf.int32))

    def train_batches(self, batch_size: int, seed: int, epoch: int, *, start_step: int = 0,
                      chunk: int = 1, process_index: int = 0, process_count: int = 1,
                      num_steps: Optional[int] = None) -> Iterator[dict]:
        """As :meth:`Split.train_batches`, from this process's shard: its files and then its
        examples (in a buffer of ``_SHUFFLE_BUFFER``) shuffled by ``(seed, epoch)``, cut
        into local batches; a pure function of ``(seed, epoch)`` too, so a resumed run
        skips to the same batches."""
        import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
        stop = _check_steps(len(self), batch_size, start_step, num_steps, chunk)
        columns = local_columns(batch_size, process_index, process_count)
        local_batch = columns.stop - columns.start
        tf = tensorflow()
        shard = tfds.split_for_jax_process(self.split, process_index=process_index,
                                           process_count=process_count, drop_remainder=True)
        shuffle_seed = int(random_stream(seed, _SHUFFLE_STREAM, epoch).integers(2 ** 31))
        ds = self._examples(shard, shuffle_files=True,
                            read_config=tfds.ReadConfig(shuffle_seed=shuffle_seed))
        ds = ds.shuffle(_SHUFFLE_BUFFER, seed=shuffle_seed, reshuffle_each_iteration=False)
        augmentation = self.augmentation
        if augmentation is not None:  # an example's draw: by its position in the epoch
            shard_size = len(self) // process_count
            draws = tf.constant(augmentation.draws(seed, epoch, len(self)))
            ds = ds.enumerate(start=process_index * shard_size)
        ds = ds.batch(local_batch, drop_remainder=True).skip(start_step).take(stop - start_step)

        def preprocess(*batch):
            position, (images, labels) = batch if augmentation is not None else (None, batch)
            x, y = self._preprocess(images, labels)
            if augmentation is not None:
                x = augmentation.apply(x, tf.gather(draws, position))
            return {"input": x, "target": y}

        ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return ds.batch(chunk).prefetch(tf.data.AUTOTUNE).as_numpy_iterator()

    def eval_batches(self, batch_size: int, *, process_index: int = 0,
                     process_count: int = 1) -> Iterator[dict]:
        """As :meth:`bioflax.trainer.ArrayData.eval_batches`: each process reads its own
        shard in order, padded (mask 0) to as many batches as the largest shard needs."""
        import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
        columns = local_columns(batch_size, process_index, process_count,
                                name="eval_batch_size")
        local_batch = columns.stop - columns.start
        tf = tensorflow()
        shard = tfds.split_for_jax_process(self.split, process_index=process_index,
                                           process_count=process_count)
        splits = self.builder.info.splits
        largest = math.ceil(splits[self.split].num_examples / process_count)
        padding = math.ceil(largest / local_batch) * local_batch - splits[shard].num_examples
        ds = self._examples(shard)
        blank = tf.zeros(ds.element_spec[0].shape, ds.element_spec[0].dtype)
        ds = ds.map(lambda x, y: (x, y, 1.0)).concatenate(tf.data.Dataset.from_tensors(
            (blank, tf.zeros([], ds.element_spec[1].dtype), 0.0)).repeat(padding))

        def preprocess(images, labels, mask):
            x, y = self._preprocess(images, labels)
            real = tf.reshape(mask > 0, [-1] + [1] * len(self.input_shape))
            return {"input": tf.where(real, x, tf.zeros_like(x)), "target": y, "mask": mask}

        ds = ds.batch(local_batch).map(preprocess, num_parallel_calls=tf.data.AUTOTUNE,
                                       deterministic=True)
        return ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator()


class TFData(DataSource):
    """The batches of a :class:`Split` or :class:`StreamedSplit` through tf.data
    (``train_batches``), each process reading its own part; one seed."""

    def sample_input(self) -> np.ndarray:
        return self.split.head(1).inputs

    def chunks(self, placement, batch_size, seeds, epoch, start, stop, chunk_steps):
        (seed,) = seeds
        batches = self.split.train_batches(
            batch_size, seed, epoch, start_step=start, num_steps=stop - start,
            chunk=chunk_steps, process_index=jax.process_index(),
            process_count=jax.process_count())
        # The next chunks become global arrays on a thread while the current one trains.
        for chunk in prefetch(batches, lambda c: placement.to_global(c, placement.chunk)):
            yield (), chunk, chunk["input"].shape[0]

    @staticmethod
    def batch(data, x, placement):
        return x
