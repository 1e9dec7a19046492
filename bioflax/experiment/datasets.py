"""Data sets: TFDS image classification (MNIST, Fashion-MNIST, CIFAR-10/100, SVHN), the
teacher-student task, sine regression and next-token prediction on a local text file
(:class:`TextFile`), chosen by name from :data:`DATASETS`.

:func:`load` returns each split as a pair of NumPy arrays
(:class:`~bioflax.experiment.input_pipeline.Split`), already normalised, or, with
``data.streaming``, as a TFDS split read from its files as it is used
(:class:`~bioflax.experiment.input_pipeline.StreamedSplit`); the training split may carry an
:class:`Augmentation` (random crop, flip).

Config fields read from ``config.data`` (see ``configs/default.py``): ``dataset``,
``data_dir``, ``batch_size``, ``eval_batch_size``, ``val_split``, ``normalize_mean``,
``normalize_std``, ``input_dim``, ``output_dim``, ``train_size``, ``test_size``,
``teacher_hidden_layers``, ``teacher_activation``, for ``'text'`` ``text_path``,
``context_length``, ``text_tokens``, ``text_test_fraction``, ``text_stride`` and,
optionally, ``download`` (default True: fetch a TFDS data set when no prepared copy is
found and the network is reachable), ``flatten`` (default True), ``random_crop_padding``
(default 0) and ``random_flip`` (default False).
"""

import dataclasses
import math
import os
import socket
import threading
from typing import Callable, Optional, Sequence

import jax
import ml_collections
import numpy as np
from flax import linen as nn

from bioflax.experiment.errors import DataNotFoundError
from bioflax.experiment.input_pipeline import Split, StreamedSplit, tensorflow
from bioflax.models import get_activation
from bioflax.trainer.arrays import random_stream

# Where TFDS downloads its data sets from; probed before a download so that an offline
# machine fails at once instead of after a network time-out.
_TFDS_DOWNLOAD_HOST = ("storage.googleapis.com", 443)
_NETWORK_PROBE_TIMEOUT_S = 3.0
_READ_BATCH = 10_000  # examples per batch when a split is read whole into memory

# Tags that keep the random streams of different purposes apart for one seed.
_TEACHER_STREAM = 0x746561  # "tea"
_SINREG_STREAM = 0x73696E  # "sin"
_AUGMENT_STREAM = 0x617567  # "aug"


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    problem: str  # 'classification', 'regression' or 'language_modeling'
    input_shape: tuple[int, ...]  # of one example after preprocessing, e.g. (784,)
    num_outputs: int  # classes (10 for MNIST), regression output dim or vocabulary size


# ----------------------------------------------------------------------------- loading


def load(data_config: ml_collections.ConfigDict,
         seed: int) -> tuple[DatasetInfo, dict[str, Split]]:
    """Loads ``data_config.dataset`` (a name of :data:`DATASETS`): its info and splits
    ``'train'``, ``'test'`` and, when ``data_config.val_split > 0``, ``'validation'`` (held
    out of train, fixed by ``seed``). The training split carries the augmentation that
    ``data_config`` asks for (applied by its ``train_batches``)."""
    name = data_config.dataset
    if name not in DATASETS:
        raise ValueError(f"Unknown data.dataset {name!r}; choose one of {list(DATASETS)}.")
    val_split = check_val_split(data_config.val_split or 0.0)

    spec = DATASETS[name]
    if hasattr(spec, "load_splits"):  # a data set that holds out its own validation split
        info, splits = spec.load_splits(data_config, seed)
    else:
        info, train, test = spec.load(data_config, seed)
        splits = {"train": train, "test": test}
        if val_split > 0:
            splits["train"], splits["validation"] = train.hold_out(val_split, seed)
    augmentation = Augmentation.from_config(data_config)
    if augmentation is not None:
        splits["train"] = dataclasses.replace(splits["train"], augmentation=augmentation)
    return info, splits


def check_val_split(value) -> float:
    """``data.val_split``, the fraction of the training split held out for validation, as a
    float; ValueError unless it lies in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"data.val_split must lie in [0, 1) (0: no validation split), got "
                         f"{value!r}.")
    return float(value)


@dataclasses.dataclass(frozen=True)
class TFDSImages:
    """A TFDS image-classification data set (features ``image``, uint8 ``(H, W, C)``, and
    ``label``), with the per-channel ``mean`` and ``std`` of its training pixels scaled to
    [0, 1] that normalise it by default."""

    tfds_name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    problem = "classification"

    def num_outputs(self, data_config) -> int:
        del data_config
        return self.num_classes

    def image_size(self, data_config) -> tuple[int, int, int]:
        """``(H, W, C)`` of the images the model sees: ``data.image_size`` × the same, when
        set (LeNet-5 reads MNIST at 32×32, as biotorch resizes it), else the data set's."""
        size = data_config.get("image_size", None)
        return self.image_shape if size is None else (size, size, self.image_shape[-1])

    def input_shape(self, data_config) -> tuple[int, ...]:
        """``(H·W·C,)`` with ``data.flatten`` (inputs of an MLP), else ``(H, W, C)``."""
        flatten = data_config.get("flatten", True)
        image = self.image_size(data_config)
        return (math.prod(image),) if flatten else image

    def normalization(self, data_config) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel ``(mean, std)``: ``data.normalize_mean``/``normalize_std`` for every
        channel when set, else the data set's own statistics."""
        def per_channel(value, default):
            value = default if value is None else (float(value),) * len(default)
            return np.asarray(value, np.float32)
        return (per_channel(data_config.get("normalize_mean"), self.mean),
                per_channel(data_config.get("normalize_std"), self.std))

    def load(self, data_config, seed: int) -> tuple[DatasetInfo, "Split", "Split"]:
        del seed
        builder = _prepared_builder(self.tfds_name, data_config)
        mean, std = self.normalization(data_config)
        shape = self.input_shape(data_config)
        info = DatasetInfo(self.problem, shape, self.num_classes)
        if data_config.get("streaming", False):
            stream = lambda split: StreamedSplit(builder, split, mean, std, shape)
            return info, stream("train"), stream("test")
        arrays = _read_whole(builder, ("train", "test"))

        image_size = self.image_size(data_config)

        def preprocess(images, labels) -> Split:
            x = images.astype(np.float32) / np.float32(255.0)
            if image_size != self.image_shape:  # bilinear, half-pixel centres (as PIL's)
                x = np.asarray(jax.image.resize(x, (len(x), *image_size), "bilinear"))
            x = ((x - mean) / std).reshape(len(images), *shape)
            return Split(x.astype(np.float32, copy=False), labels.astype(np.int32))

        return info, preprocess(*arrays["train"]), preprocess(*arrays["test"])


@dataclasses.dataclass(frozen=True)
class Synthetic:
    """A data set generated from ``seed`` by ``make(data_config, seed)``."""

    problem: str
    make: Callable

    def num_outputs(self, data_config) -> int:
        return int(data_config.output_dim)

    def load(self, data_config, seed: int):
        return self.make(data_config, seed)


def _prepared_builder(name: str, cfg):
    """The TFDS builder of ``name``, prepared (downloaded when allowed and reachable);
    DataNotFoundError naming where TFDS looked otherwise."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    data_dir = cfg.get("data_dir", None)
    if data_dir is not None:
        data_dir = os.path.abspath(os.path.expanduser(str(data_dir)))
    looked_in = data_dir or os.environ.get("TFDS_DATA_DIR") or "the TFDS default data dir"
    fix = (f"Point TFDS at a directory that holds a prepared {name} with "
           "--config.data.data_dir=/path/to/tensorflow_datasets or the environment "
           "variable TFDS_DATA_DIR, or run once on a machine with internet access.")

    try:
        builder = tfds.builder(name, data_dir=data_dir)
        looked_in = builder.data_dir
        prepared = builder.is_prepared()
    except Exception as e:  # pylint: disable=broad-except
        raise DataNotFoundError(
            f"Could not open the {name} data set of TFDS (looked in {looked_in}): {e}. {fix}"
        ) from e

    if not prepared:
        if not cfg.get("download", True):
            raise DataNotFoundError(
                f"{name} is not prepared in {looked_in} and data.download is False. {fix}")
        reachable, why = _can_reach(_TFDS_DOWNLOAD_HOST, _NETWORK_PROBE_TIMEOUT_S)
        if not reachable:
            raise DataNotFoundError(
                f"{name} is not prepared in {looked_in}, and it cannot be downloaded: "
                f"{_TFDS_DOWNLOAD_HOST[0]} is unreachable ({why!r}). {fix}") from why
        try:
            builder.download_and_prepare()
        except Exception as e:  # pylint: disable=broad-except
            raise DataNotFoundError(
                f"{name} is not prepared in {looked_in} and downloading it failed: {e}. {fix}"
            ) from e
    return builder


def _read_whole(builder, splits) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{split: (images, labels)}`` read whole into NumPy arrays (in batches: the size
    of a split is not always known before it is read)."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    def read(split):
        ds = builder.as_dataset(split=split, as_supervised=True).batch(_READ_BATCH)
        images, labels = zip(*tfds.as_numpy(ds))
        return np.concatenate(images), np.concatenate(labels)

    try:
        return {split: read(split) for split in splits}
    except Exception as e:  # pylint: disable=broad-except
        raise DataNotFoundError(
            f"{builder.name} in {builder.data_dir} could not be read (truncated or corrupt "
            f"files?): {type(e).__name__}: {e}. Delete that directory and download it again, "
            "or point --config.data.data_dir / TFDS_DATA_DIR at an intact copy.") from e


def _can_reach(address: tuple[str, int], timeout: float) -> tuple[bool, Exception | None]:
    """Whether a TCP connection to ``address`` opens within ``timeout`` seconds (name
    resolution included, which ``socket`` alone cannot time out)."""
    result: list = []

    def probe():
        try:
            socket.create_connection(address, timeout=timeout).close()
            result.append(None)
        except OSError as e:
            result.append(e)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    if not result:
        return False, TimeoutError(f"no connection to {address[0]} within {timeout} s")
    return result[0] is None, result[0]


def _check_sizes(cfg) -> tuple[int, int, int, int]:
    values = {}
    for field in ("input_dim", "output_dim", "train_size", "test_size"):
        value = cfg[field]
        if not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"data.{field} must be a positive integer, got {value!r}.")
        values[field] = int(value)
    return values["input_dim"], values["output_dim"], values["train_size"], values["test_size"]


class TeacherNetwork(nn.Module):
    """The fixed random network that labels the teacher-student task.

    ``y = φ(W_L … φ(W_1 x + b_1) … + b_L)``: ``activation`` follows every layer, the
    output layer included, so ``identity`` gives a linear teacher ``y = T x + c``.
    """

    hidden_layers: Sequence[int]
    features: int
    activation: str = "identity"

    @nn.compact
    def __call__(self, x):
        activation = get_activation(self.activation)
        x = x.reshape((x.shape[0], -1))
        for width in (*self.hidden_layers, self.features):
            x = activation(nn.Dense(width)(x))
        return x


def _make_teacher(cfg, seed: int) -> tuple[DatasetInfo, Split, Split]:
    """Inputs uniform in [-1, 1]^input_dim; targets from a fixed random TeacherNetwork."""
    input_dim, output_dim, train_size, test_size = _check_sizes(cfg)
    rng = random_stream(seed, _TEACHER_STREAM)
    x_train = rng.uniform(-1.0, 1.0, (train_size, input_dim)).astype(np.float32)
    x_test = rng.uniform(-1.0, 1.0, (test_size, input_dim)).astype(np.float32)

    teacher = TeacherNetwork(
        hidden_layers=tuple(cfg.teacher_hidden_layers), features=output_dim,
        activation=cfg.teacher_activation)
    cpu = jax.local_devices(backend="cpu")[0]  # this process's: a multi-process run has others
    with jax.default_device(cpu), jax.default_matmul_precision("highest"):
        params = teacher.init(jax.random.key(seed), x_train[:1])
        y_train = np.asarray(teacher.apply(params, x_train), dtype=np.float32)
        y_test = np.asarray(teacher.apply(params, x_test), dtype=np.float32)

    info = DatasetInfo("regression", (input_dim,), output_dim)
    return info, Split(x_train, y_train), Split(x_test, y_test)


def check_sinreg_dims(input_dim, output_dim) -> None:
    """ValueError unless both are 1: sinreg is y = sin(x)."""
    if input_dim != 1 or output_dim != 1:
        raise ValueError("data.dataset='sinreg' is y = sin(x): it needs data.input_dim == 1 "
                         f"and data.output_dim == 1, got {input_dim} and {output_dim}.")


def _make_sinreg(cfg, seed: int) -> tuple[DatasetInfo, Split, Split]:
    """x uniform in [-π, π], y = sin(x), both (N, 1)."""
    input_dim, output_dim, train_size, test_size = _check_sizes(cfg)
    check_sinreg_dims(input_dim, output_dim)
    rng = random_stream(seed, _SINREG_STREAM)

    def draw(n: int) -> Split:
        x = rng.uniform(-np.pi, np.pi, (n, 1)).astype(np.float32)
        return Split(x, np.sin(x.astype(np.float64)).astype(np.float32))

    info = DatasetInfo("regression", (1,), 1)
    return info, draw(train_size), draw(test_size)


@dataclasses.dataclass(frozen=True)
class TextFile:
    """Next-token prediction on a local UTF-8 text file (``data.dataset = 'text'``).

    ``data.text_path`` names the file; ``data.text_tokens`` says what a token is:
    ``'bytes'`` (the file's bytes, a vocabulary of 256, any file) or ``'characters'``
    (its Unicode code points, the vocabulary the sorted distinct characters of the whole
    file). The token stream is cut into three contiguous parts, in order: training, then
    validation (the last ``data.val_split`` of what precedes the test part; none when 0),
    then test (the last ``data.text_test_fraction`` of the file): held-out tails, never
    random windows, so no evaluated text was trained on. Each part becomes windows of
    ``data.context_length`` = T tokens starting every ``data.text_stride`` tokens (None: T,
    windows that do not overlap) from the part's start: inputs ``part[s:s+T]``, targets
    ``part[s+1:s+T+1]`` (int32 ``(N, T)`` both); the tail that fills no whole window is
    dropped."""

    problem = "language_modeling"
    token_kinds = ("bytes", "characters")

    @staticmethod
    def check_path(path) -> str:
        """``data.text_path`` with ``~`` expanded; ValueError unless it names a file."""
        if path is None or not os.path.isfile(os.path.expanduser(str(path))):
            raise ValueError("data.dataset='text' reads a local UTF-8 text file: pass "
                             "--config.data.text_path=FILE of an existing file")
        return os.path.expanduser(str(path))

    @staticmethod
    def check_fraction(value) -> float:
        """``data.text_test_fraction`` as a float; ValueError unless it lies in (0, 1)."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            raise ValueError(f"data.text_test_fraction must lie in (0, 1), got {value!r}")
        return float(value)

    @classmethod
    def read(cls, data_config) -> tuple[np.ndarray, int]:
        """The file's tokens (int32) and the vocabulary size."""
        path = cls.check_path(data_config.text_path)
        kind = data_config.get("text_tokens", "bytes")
        if kind not in cls.token_kinds:
            raise ValueError(f"data.text_tokens must be one of {list(cls.token_kinds)}, got "
                             f"{kind!r}")
        with open(path, "rb") as f:
            raw = f.read()
        if kind == "bytes":
            return np.frombuffer(raw, np.uint8).astype(np.int32), 256
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"data.text_path={path!r} is not UTF-8 ({e}); use "
                             "data.text_tokens='bytes' for any file.") from e
        codes = np.frombuffer(text.encode("utf-32-le"), np.uint32)
        vocabulary = np.unique(codes)
        return np.searchsorted(vocabulary, codes).astype(np.int32), len(vocabulary)

    @staticmethod
    def parts(num_tokens: int, data_config) -> dict[str, tuple[int, int]]:
        """``{split: (start, stop)}`` of the token stream: ``'train'``, ``'validation'``
        (when ``data.val_split > 0``) and ``'test'``."""
        fraction = TextFile.check_fraction(data_config.text_test_fraction)
        test_start = num_tokens - int(round(fraction * num_tokens))
        val_split = float(data_config.val_split or 0.0)
        val_start = test_start - int(round(val_split * test_start))
        parts = {"train": (0, val_start), "test": (test_start, num_tokens)}
        if val_split > 0:
            parts["validation"] = (val_start, test_start)
        return parts

    @staticmethod
    def windows(tokens: np.ndarray, length: int, stride: int) -> Split:
        """Inputs ``tokens[s:s+length]`` and targets ``tokens[s+1:s+length+1]`` for
        ``s = 0, stride, 2·stride, …`` while a whole target window fits."""
        starts = np.arange(0, len(tokens) - length, stride)
        index = starts[:, None] + np.arange(length)[None, :]
        return Split(tokens[index].astype(np.int32), tokens[index + 1].astype(np.int32))

    def num_outputs(self, data_config) -> int:
        if data_config.get("text_tokens", "bytes") == "bytes":
            return 256
        return self.read(data_config)[1]

    def check_windows(self, data_config, tokens: Optional[np.ndarray] = None) -> None:
        """ValueError unless every split of the file holds a window of
        ``data.context_length`` + 1 tokens (``tokens``: the file's, when already read)."""
        tokens = self.read(data_config)[0] if tokens is None else tokens
        length = data_config.context_length
        for name, (start, stop) in self.parts(len(tokens), data_config).items():
            if stop - start < length + 1:
                raise ValueError(
                    f"the {name} split of data.text_path ({len(tokens)} tokens in all) holds "
                    f"{stop - start} tokens, fewer than a window of context_length + 1: use "
                    "a longer text or a shorter context")

    def load_splits(self, data_config, seed: int) -> tuple[DatasetInfo, dict[str, Split]]:
        """The info and every split (the validation split is a tail of the text, so this
        data set makes it itself; ``seed`` is unused)."""
        del seed
        tokens, vocabulary = self.read(data_config)
        self.check_windows(data_config, tokens)
        length = int(data_config.context_length)
        stride = int(data_config.get("text_stride") or length)
        splits = {name: self.windows(tokens[start:stop], length, stride)
                  for name, (start, stop) in self.parts(len(tokens), data_config).items()}
        return DatasetInfo(self.problem, (length,), vocabulary), splits


# Every data set by name. The mean and std of a TFDS entry are per channel, over all pixels
# of its training split scaled to [0, 1]. MNIST's are the values of the PyTorch MNIST example
# (tests/test_data.py recomputes them from the prepared copy); the others are the values
# published with those data sets' common training recipes (Fashion-MNIST: 0.2860/0.3530;
# CIFAR-10/100: per-channel std over all pixels, not the mean of per-image stds; SVHN:
# the cropped-digits training split); no test recomputes them.
DATASETS = {
    "mnist": TFDSImages("mnist", 10, (28, 28, 1), (0.1307,), (0.3081,)),
    "fashion_mnist": TFDSImages("fashion_mnist", 10, (28, 28, 1), (0.2860,), (0.3530,)),
    "cifar10": TFDSImages("cifar10", 10, (32, 32, 3), (0.4914, 0.4822, 0.4465),
                          (0.2470, 0.2435, 0.2616)),
    "cifar100": TFDSImages("cifar100", 100, (32, 32, 3), (0.5071, 0.4865, 0.4409),
                           (0.2673, 0.2564, 0.2762)),
    "svhn_cropped": TFDSImages("svhn_cropped", 10, (32, 32, 3), (0.4377, 0.4438, 0.4728),
                               (0.1980, 0.2010, 0.1970)),
    "teacher": Synthetic("regression", _make_teacher),
    "sinreg": Synthetic("regression", _make_sinreg),
    "text": TextFile(),
}
# Each data set's kind of problem ("classification", "regression" or "language_modeling"),
# which decides the metrics and the losses it can train with.
DATASET_PROBLEMS = {name: spec.problem for name, spec in DATASETS.items()}


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """The standard training augmentation of small images, run in tf.data by
    the splits' ``train_batches``: a random crop back to the image size after
    padding every side by ``padding`` black pixels, and a horizontal flip with probability
    1/2 (``flip``).

    Each example's draw is a pure function of ``(seed, epoch, example index)``
    (:meth:`draws`), so a resumed run, another chunk size or another process count sees the
    same augmented images. ``fill`` is a black pixel after normalisation, per channel.
    """

    image_shape: tuple[int, int, int]
    padding: int
    flip: bool
    fill: tuple[float, ...]

    @classmethod
    def from_config(cls, data_config) -> Optional["Augmentation"]:
        """What ``data.random_crop_padding`` and ``data.random_flip`` ask for; None: none."""
        padding = int(data_config.get("random_crop_padding", 0) or 0)
        flip = bool(data_config.get("random_flip", False))
        if not padding and not flip:
            return None
        spec = DATASETS[data_config.dataset]
        if not isinstance(spec, TFDSImages):
            raise ValueError(f"data.dataset={data_config.dataset!r} has no images to crop or "
                             "flip: set data.random_crop_padding=0 and data.random_flip=False.")
        if padding < 0:
            raise ValueError(f"data.random_crop_padding must be >= 0, got {padding}.")
        mean, std = spec.normalization(data_config)
        return cls(spec.image_shape, padding, flip, tuple(float(v) for v in -mean / std))

    def draws(self, seed: int, epoch: int, num_examples: int) -> np.ndarray:
        """int32 ``(num_examples, 3)``: each example's crop row and column offsets in
        ``[0, 2·padding]`` and its flip (0 or 1) in epoch ``epoch``."""
        rng = random_stream(seed, _AUGMENT_STREAM, epoch)
        offsets = rng.integers(0, 2 * self.padding + 1, size=(num_examples, 2))
        flips = rng.integers(0, 2 if self.flip else 1, size=(num_examples, 1))
        return np.concatenate([offsets, flips], axis=1).astype(np.int32)

    def apply(self, inputs, draws):
        """``inputs`` ``(..., *input_shape)`` (flattened or ``(H, W, C)`` images) augmented
        as ``draws`` ``(..., 3)`` say; a TensorFlow op of the same shape."""
        tf = tensorflow()
        height, width, channels = self.image_shape
        x = tf.reshape(inputs, [-1, height, width, channels])
        d = tf.reshape(draws, [-1, 3])
        if self.padding:
            p = [[self.padding, self.padding], [self.padding, self.padding], [0, 0]]
            # x + 0 keeps every image pixel exact; the border gets the normalised black.
            border = tf.pad(tf.zeros([height, width, 1], x.dtype), p, constant_values=1.0)
            x = tf.pad(x, [[0, 0]] + p) + border * tf.constant(self.fill, x.dtype)
            x = tf.gather(x, d[:, :1] + tf.range(height), axis=1, batch_dims=1)
            x = tf.gather(x, d[:, 1:2] + tf.range(width), axis=2, batch_dims=1)
        if self.flip:
            x = tf.where(tf.reshape(d[:, 2] > 0, [-1, 1, 1, 1]), tf.reverse(x, [2]), x)
        return tf.reshape(x, tf.shape(inputs))
