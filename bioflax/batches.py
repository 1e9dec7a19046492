"""Batches of a :mod:`bioflax.data` split, in one of two equivalent ways:

* :func:`train_batches` / :func:`eval_batches`: a ``tf.data`` pipeline over the in-memory
  arrays (index order → batch → ``tf.gather``; prefetched), or over a streamed split's
  files, which also cuts each global batch into this process's rows;
* the trainer's in-memory fast path, ``split.inputs[epoch_order(seed, epoch, N)[i*B:(i+1)*B]]``
  on device.

Both give batch ``i`` of epoch ``e`` the same examples in the same order: the order of an
epoch is a pure function of ``(seed, epoch)`` (:func:`epoch_order`), so a run resumed at
step ``s`` sees exactly the batches it would have seen (``start_step``). :func:`prefetch`
makes the next chunks ready on a background thread.
"""

import math
import queue
import threading
from typing import Callable, Iterable, Iterator, Optional

import numpy as np

from bioflax.data import Split, StreamedSplit, random_stream, tensorflow, tf_aligned

_SHUFFLE_STREAM = 0x736875  # "shu": the random stream of a streamed split's shuffles
# Examples a streamed training split shuffles among (after shuffling its files).
_SHUFFLE_BUFFER = 10_000


def epoch_order(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The order in which epoch ``epoch`` visits the ``num_examples`` training examples: a
    permutation of ``range(num_examples)``, a pure function of ``(seed, epoch)``."""
    return random_stream(seed, epoch).permutation(num_examples)


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
    """Full batches in one epoch (the remainder is dropped)."""
    if global_batch_size <= 0:
        raise ValueError(f"data.batch_size must be positive, got {global_batch_size}.")
    return num_examples // global_batch_size


def check_batch_size(global_batch_size: int, num_devices: int, *,
                     field: str = "data.batch_size") -> None:
    """Raises ValueError unless ``global_batch_size`` splits evenly over ``num_devices``."""
    if global_batch_size <= 0 or global_batch_size % num_devices:
        raise ValueError(
            f"{field}={global_batch_size} must be a positive multiple of the number of "
            f"devices ({num_devices}): each device gets an equal share of the global batch. "
            f"Use e.g. --config.{field}="
            f"{max(1, round(global_batch_size / num_devices)) * num_devices}.")


def _local_columns(global_batch_size: int, process_index: int, process_count: int,
                   field: str) -> slice:
    if process_count <= 0 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count="
                         f"{process_count}).")
    check_batch_size(global_batch_size, process_count, field=field)
    local = global_batch_size // process_count
    return slice(process_index * local, (process_index + 1) * local)


def _as_tensors(split: Split):
    return _to_tensor(split.inputs), _to_tensor(split.targets)


def _to_tensor(array: np.ndarray):
    """``array`` as a CPU tensor. An array aligned as TF requires (as :func:`load` makes
    them) is shared through DLPack, so that a new pipeline per epoch does not copy the data
    set; the split must then not be modified while a pipeline over it runs. Any other array
    is copied."""
    tf = tensorflow()
    if array.size and tf_aligned(array):
        try:
            return tf.experimental.dlpack.from_dlpack(array.__dlpack__())
        except Exception:  # pylint: disable=broad-except
            pass
    return tf.convert_to_tensor(array)


def train_batches(split: Split | StreamedSplit, global_batch_size: int, seed: int,
                  epoch: int, *,
                  start_step: int = 0, chunk: int = 1, process_index: int = 0,
                  process_count: int = 1, num_steps: Optional[int] = None) -> Iterator[dict]:
    """This process's training batches of one epoch, ``chunk`` steps at a time.

    Global batch ``i`` is ``epoch_order(seed, epoch, N)[i*B:(i+1)*B]`` (the last partial
    batch is dropped); the first ``start_step`` batches are skipped, and only ``num_steps``
    batches are given when set (default: to the end of the epoch); this process keeps rows
    ``[p*B/P, (p+1)*B/P)`` of each; the split's augmentation, if any, is applied to every
    example as :meth:`bioflax.data.Augmentation.draws` says for ``(seed, epoch)``. Yields
    ``{'input': (k, B/P, *input_shape), 'target': (k, B/P, ...)}`` NumPy arrays, ``k ==
    chunk`` except possibly for the epoch's last chunk.
    """
    n = len(split)
    steps = steps_per_epoch(n, global_batch_size)
    if steps == 0:
        raise ValueError(f"data.batch_size={global_batch_size} exceeds the {n} training "
                         "examples: an epoch would have no step.")
    if not 0 <= start_step <= steps:
        raise ValueError(f"start_step={start_step} must be in [0, {steps}] "
                         f"(steps per epoch).")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}.")
    stop = steps if num_steps is None else start_step + num_steps
    if not start_step <= stop <= steps:
        raise ValueError(f"num_steps={num_steps} must be in [0, {steps - start_step}] "
                         f"(steps left in the epoch after start_step={start_step}).")
    columns = _local_columns(global_batch_size, process_index, process_count,
                             "data.batch_size")
    if isinstance(split, StreamedSplit):
        return _streamed_train_batches(split, columns.stop - columns.start, seed, epoch,
                                       start_step, stop, chunk, process_index, process_count)

    order = epoch_order(seed, epoch, n)[:steps * global_batch_size]
    local_idx = order.reshape(steps, global_batch_size)[start_step:stop, columns]
    tf = tensorflow()
    inputs, targets = _as_tensors(split)
    augmentation = split.augmentation
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


def eval_batches(split: Split | StreamedSplit, global_batch_size: int, *,
                 process_index: int = 0, process_count: int = 1) -> Iterator[dict]:
    """Every example exactly once, in order, in global batches of ``global_batch_size``.

    The last batch is padded to full size with zero rows; ``'mask'`` (float32) is 1 for a
    real example and 0 for padding. Yields this process's rows ``{'input', 'target',
    'mask'}`` of each global batch (rows ``[p*B/P, (p+1)*B/P)``).
    """
    columns = _local_columns(global_batch_size, process_index, process_count,
                             "data.eval_batch_size")
    if isinstance(split, StreamedSplit):
        return _streamed_eval_batches(split, columns.stop - columns.start, process_index,
                                      process_count)
    n = len(split)
    num_batches = math.ceil(n / global_batch_size)
    padded = np.arange(num_batches * global_batch_size, dtype=np.int64)
    mask = (padded < n).astype(np.float32)
    padded = np.where(padded < n, padded, 0)
    local_idx = padded.reshape(num_batches, global_batch_size)[:, columns]
    local_mask = mask.reshape(num_batches, global_batch_size)[:, columns]
    tf = tensorflow()
    inputs, targets = _as_tensors(split)

    def gather(idx, m):
        real = m > 0

        def pick(array):
            values = tf.gather(array, idx)
            keep = tf.reshape(real, [-1] + [1] * (len(array.shape) - 1))
            return tf.where(keep, values, tf.zeros_like(values))

        return {"input": pick(inputs), "target": pick(targets), "mask": m}

    ds = tf.data.Dataset.from_tensor_slices((local_idx, local_mask))
    ds = ds.map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    return _untuned(ds).as_numpy_iterator()


def _untuned(ds):
    """``ds`` without tf.data's default graph rewrites and its autotuner.

    The rewrites run over the pipeline's graph, which holds the whole in-memory split, each
    time an iterator starts: on a 2-core CPU under load that took 2.5-3.5 s per epoch (0.3-0.6
    s without), for no gain in a pipeline of one gather. The autotuner's background thread
    took CPU from the training step it feeds: on a 2-core Xeon it capped the tf.data path of
    ``benchmarks/throughput.py`` near 46,500 ex/s for every rule (README "Performance":
    tf.data / in-memory medians 0.80-0.94 with it, 0.93-0.95 without)."""
    options = tensorflow().data.Options()
    options.experimental_optimization.apply_default_optimizations = False
    options.autotune.enabled = False
    return ds.with_options(options)


def _streamed_train_batches(split: StreamedSplit, local_batch: int, seed: int, epoch: int,
                            start_step: int, stop: int, chunk: int, process_index: int,
                            process_count: int) -> Iterator[dict]:
    """:func:`train_batches` of a streamed split: this process's shard, its files and then
    its examples (in a buffer of ``_SHUFFLE_BUFFER``) shuffled by ``(seed, epoch)``, cut into
    local batches; a pure function of ``(seed, epoch)`` too, so a resumed run skips to the
    same batches."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    tf = tensorflow()
    shard = tfds.split_for_jax_process(split.split, process_index=process_index,
                                       process_count=process_count, drop_remainder=True)
    shuffle_seed = int(random_stream(seed, _SHUFFLE_STREAM, epoch).integers(2 ** 31))
    ds = split._examples(shard, shuffle_files=True,  # pylint: disable=protected-access
                         read_config=tfds.ReadConfig(shuffle_seed=shuffle_seed))
    ds = ds.shuffle(_SHUFFLE_BUFFER, seed=shuffle_seed, reshuffle_each_iteration=False)
    augmentation = split.augmentation
    if augmentation is not None:  # an example's draw: by its position in the epoch
        shard_size = len(split) // process_count
        draws = tf.constant(augmentation.draws(seed, epoch, len(split)))
        ds = ds.enumerate(start=process_index * shard_size)
    ds = ds.batch(local_batch, drop_remainder=True).skip(start_step).take(stop - start_step)

    def preprocess(*batch):
        position, (images, labels) = batch if augmentation is not None else (None, batch)
        x, y = split._preprocess(images, labels)  # pylint: disable=protected-access
        if augmentation is not None:
            x = augmentation.apply(x, tf.gather(draws, position))
        return {"input": x, "target": y}

    ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(chunk).prefetch(tf.data.AUTOTUNE).as_numpy_iterator()


def _streamed_eval_batches(split: StreamedSplit, local_batch: int, process_index: int,
                           process_count: int) -> Iterator[dict]:
    """:func:`eval_batches` of a streamed split: each process reads its own shard in order,
    padded (mask 0) to as many batches as the largest shard needs."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    tf = tensorflow()
    shard = tfds.split_for_jax_process(split.split, process_index=process_index,
                                       process_count=process_count)
    splits = split.builder.info.splits
    largest = math.ceil(splits[split.split].num_examples / process_count)
    padding = math.ceil(largest / local_batch) * local_batch - splits[shard].num_examples
    ds = split._examples(shard)  # pylint: disable=protected-access
    blank = tf.zeros(ds.element_spec[0].shape, ds.element_spec[0].dtype)
    ds = ds.map(lambda x, y: (x, y, 1.0)).concatenate(tf.data.Dataset.from_tensors(
        (blank, tf.zeros([], ds.element_spec[1].dtype), 0.0)).repeat(padding))

    def preprocess(images, labels, mask):
        x, y = split._preprocess(images, labels)  # pylint: disable=protected-access
        real = tf.reshape(mask > 0, [-1] + [1] * len(split.input_shape))
        return {"input": tf.where(real, x, tf.zeros_like(x)), "target": y, "mask": mask}

    ds = ds.batch(local_batch).map(preprocess, num_parallel_calls=tf.data.AUTOTUNE,
                                   deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator()


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
