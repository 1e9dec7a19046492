"""Tests of bioflax.experiment.datasets and its input pipeline on real MNIST (the offline
TFDS copy, see conftest.py) and on the synthetic teacher-student and sine tasks."""

import collections
import itertools
import math
import os
import pathlib
import shutil
import threading
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from bioflax.experiment import datasets as data
from bioflax.experiment import input_pipeline as batches
from bioflax.trainer import arrays


def make_config(**overrides) -> ml_collections.ConfigDict:
    """A ``config.data`` as the trainer sees it, with test-sized defaults."""
    config = ml_collections.ConfigDict(dict(
        dataset="mnist",
        data_dir=None,
        batch_size=128,
        eval_batch_size=384,
        val_split=0.0,
        normalize_mean=0.1307,
        normalize_std=0.3081,
        input_dim=8,
        output_dim=3,
        train_size=1000,
        test_size=300,
        teacher_hidden_layers=(),
        teacher_activation="identity",
    ))
    config.update(overrides)
    return config


def row_keys(split: batches.Split) -> list[bytes]:
    """One hashable key per example (its input and target bytes)."""
    return [x.tobytes() + y.tobytes() for x, y in zip(split.inputs, split.targets)]


def gather_path(split: batches.Split, batch_size: int, seed: int, epoch: int):
    """The trainer's in-memory fast path: all global batches of an epoch, stacked."""
    order = arrays.epoch_order(seed, epoch, len(split))
    steps = arrays.steps_per_epoch(len(split), batch_size)
    idx = np.stack([order[i * batch_size:(i + 1) * batch_size] for i in range(steps)])
    return split.inputs[idx], split.targets[idx]


def stack_chunks(batches):
    batches = list(batches)
    return (np.concatenate([b["input"] for b in batches]),
            np.concatenate([b["target"] for b in batches]))


@pytest.fixture(scope="module")
def mnist():
    return data.load(make_config(), seed=0)


# ----------------------------------------------------------------------------- MNIST


def test_mnist_sizes_shapes_dtypes(mnist):
    info, splits = mnist
    assert info == data.DatasetInfo("classification", (784,), 10)
    assert info.problem == data.DATASET_PROBLEMS["mnist"]
    assert set(splits) == {"train", "test"}
    for name, size in (("train", 60_000), ("test", 10_000)):
        split = splits[name]
        assert len(split) == size
        assert split.inputs.shape == (size, 784) and split.inputs.dtype == np.float32
        assert split.targets.shape == (size,) and split.targets.dtype == np.int32
        assert set(np.unique(split.targets)) == set(range(10))


def test_mnist_standardised(mnist):
    inputs = mnist[1]["train"].inputs
    assert abs(float(inputs.mean())) < 0.02
    assert abs(float(inputs.std()) - 1.0) < 0.02
    # Background pixels (0) map to -mean/std.
    np.testing.assert_allclose(inputs.min(), -0.1307 / 0.3081, rtol=1e-5)


def test_mnist_validation_split(mnist, monkeypatch):
    full = mnist[1]["train"]
    _, a = data.load(make_config(val_split=0.1), seed=0)
    assert set(a) == {"train", "validation", "test"}
    assert len(a["train"]) == 54_000 and len(a["validation"]) == 6_000
    assert len(a["test"]) == 10_000
    train_keys, val_keys = row_keys(a["train"]), row_keys(a["validation"])
    # Disjoint, and together exactly the full training set.
    assert not set(train_keys) & set(val_keys)
    assert collections.Counter(train_keys + val_keys) == collections.Counter(row_keys(full))
    # The same examples for the same seed, others for another seed (reusing the MNIST
    # arrays already read, to keep the test fast).
    monkeypatch.setitem(data.DATASETS, "mnist", data.Synthetic(
        "classification", lambda cfg, seed: (mnist[0], full, mnist[1]["test"])))
    _, b = data.load(make_config(val_split=0.1), seed=0)
    _, c = data.load(make_config(val_split=0.1), seed=1)
    for name in ("train", "validation"):
        np.testing.assert_array_equal(a[name].inputs, b[name].inputs)
        np.testing.assert_array_equal(a[name].targets, b[name].targets)
    assert set(row_keys(c["validation"])) != set(val_keys)


def test_mnist_statistics_are_those_of_its_training_pixels(mnist):
    _, raw = data.load(make_config(normalize_mean=0.0, normalize_std=1.0), seed=0)
    pixels = raw["train"].inputs.astype(np.float64)  # x / 255
    spec = data.DATASETS["mnist"]
    np.testing.assert_allclose(pixels.mean(), spec.mean[0], atol=5e-5)
    np.testing.assert_allclose(pixels.std(), spec.std[0], atol=5e-5)
    # The default (None) normalises with them: the same arrays as the explicit values.
    _, default = data.load(make_config(normalize_mean=None, normalize_std=None), seed=0)
    np.testing.assert_array_equal(default["test"].inputs, mnist[1]["test"].inputs)


# ----------------------------------------------------------------------------- TFDS images

# Per-channel mean and std of the training pixels in [0, 1], as published for each data set
# (typed here independently of bioflax/experiment/datasets.py).
PUBLISHED_STATISTICS = {
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn_cropped": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
}


def constant_images(num_examples: int):
    """A mock ``as_dataset``: image ``i`` has the value ``(i + 40·c) mod 256`` in every
    pixel of channel ``c``, and label ``i mod num_classes``."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    def as_dataset(self, *args, **kwargs):
        del args, kwargs
        shape = self.info.features["image"].shape
        classes = self.info.features["label"].num_classes
        images = np.stack([np.broadcast_to((i + 40 * np.arange(shape[-1])) % 256, shape)
                           for i in range(num_examples)]).astype(np.uint8)
        return tf.data.Dataset.from_tensor_slices(
            {"image": images, "label": np.arange(num_examples) % classes})
    return as_dataset


def load_mock(name, monkeypatch, num_examples=12, **overrides):
    """``data.load`` of TFDS data set ``name`` with :func:`constant_images` (no files, no
    network)."""
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    monkeypatch.setattr(data, "_can_reach", lambda *args: (True, None))
    config = make_config(dataset=name, normalize_mean=None, normalize_std=None,
                         data_dir="/nonexistent/tfds")
    config.update(overrides)
    with tfds.testing.mock_data(as_dataset_fn=constant_images(num_examples),
                                policy=tfds.testing.MockPolicy.USE_CODE):
        return data.load(config, seed=0)


@pytest.mark.parametrize("name", sorted(PUBLISHED_STATISTICS))
def test_every_tfds_image_data_set_is_registered_as_tfds_describes_it(name):
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    features = tfds.builder(name, data_dir="/nonexistent/tfds").info.features
    spec = data.DATASETS[name]
    assert spec.problem == data.DATASET_PROBLEMS[name] == "classification"
    assert spec.image_shape == features["image"].shape
    assert spec.num_classes == features["label"].num_classes
    assert (spec.mean, spec.std) == PUBLISHED_STATISTICS[name]


@pytest.mark.parametrize("flatten", [False, True])
def test_cifar10_is_normalised_per_channel_and_keeps_its_images(monkeypatch, flatten):
    info, splits = load_mock("cifar10", monkeypatch, flatten=flatten)
    mean, std = PUBLISHED_STATISTICS["cifar10"]
    values = (np.arange(12)[:, None] + 40 * np.arange(3)) / 255.0  # (example, channel)
    want = ((values - mean) / std)[:, None, None, :] * np.ones((12, 32, 32, 3))
    assert info == data.DatasetInfo("classification", (3072,) if flatten else (32, 32, 3), 10)
    for split in ("train", "test"):
        assert splits[split].inputs.shape == (12, *info.input_shape)
        np.testing.assert_allclose(splits[split].inputs.reshape(12, 32, 32, 3), want,
                                   rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(splits[split].targets, np.arange(12) % 10)
    assert splits["train"].augmentation is None


def test_a_number_normalises_every_channel_alike(monkeypatch):
    _, splits = load_mock("svhn_cropped", monkeypatch, normalize_mean=0.5, normalize_std=0.25,
                          flatten=False)
    values = (np.arange(12)[:, None] + 40 * np.arange(3)) / 255.0
    np.testing.assert_allclose(splits["test"].inputs[:, 5, 7, :], (values - 0.5) / 0.25,
                               rtol=1e-6, atol=1e-6)


def augmented_candidates(image: np.ndarray, padding: int, fill) -> list[np.ndarray]:
    """Every crop of ``image`` (H, W, C) padded by ``fill``, each also flipped."""
    h, w, _ = image.shape
    padded = np.pad(image - fill, ((padding, padding), (padding, padding), (0, 0))) + fill
    crops = [padded[dy:dy + h, dx:dx + w] for dy in range(2 * padding + 1)
             for dx in range(2 * padding + 1)]
    return crops + [c[:, ::-1] for c in crops]


def test_random_crop_and_flip_are_standard_and_a_function_of_seed_epoch_example(monkeypatch):
    info, splits = load_mock("cifar10", monkeypatch, num_examples=64, flatten=False,
                             random_crop_padding=4, random_flip=True)
    train, test = splits["train"], splits["test"]
    images = np.asarray(train.inputs)
    ramp = np.arange(32, dtype=np.float32)  # make every crop and flip distinguishable
    images = images + ramp[:, None, None] * 0.01 + ramp[None, :, None] * 0.001
    train = batches.Split(images, train.targets, train.augmentation)
    mean, std = np.asarray(PUBLISHED_STATISTICS["cifar10"][0]), np.asarray(
        PUBLISHED_STATISTICS["cifar10"][1])
    black = (0.0 - mean) / std

    inputs, targets = stack_chunks(train.train_batches(16, seed=3, epoch=1, chunk=2))
    inputs, targets = inputs.reshape(-1, 32, 32, 3), targets.ravel()
    order = arrays.epoch_order(3, 1, 64)
    np.testing.assert_array_equal(targets, train.targets[order])
    offsets, flips = set(), 0
    for x, index in zip(inputs, order):
        candidates = augmented_candidates(images[index], 4, black)
        match = [k for k, c in enumerate(candidates) if np.allclose(x, c, atol=1e-5)]
        assert len(match) == 1
        offsets.add(match[0] % 81)
        flips += match[0] >= 81
    assert len(offsets) > 30 and 16 < flips < 48  # 64 draws of 81 offsets and a coin

    # The same images on a resume, another chunk size, or two processes; others next epoch.
    resumed, _ = stack_chunks(train.train_batches(16, 3, 1, start_step=2, chunk=3))
    np.testing.assert_array_equal(resumed.reshape(-1, 32, 32, 3), inputs[32:])
    halves = [stack_chunks(train.train_batches(16, 3, 1, process_index=p,
                                              process_count=2))[0] for p in range(2)]
    np.testing.assert_array_equal(np.concatenate(halves, axis=1).reshape(-1, 32, 32, 3),
                                  inputs)
    again, _ = stack_chunks(train.train_batches(16, 3, 1))
    np.testing.assert_array_equal(again.reshape(-1, 32, 32, 3), inputs)
    other, _ = stack_chunks(train.train_batches(16, 3, 2))
    assert not np.array_equal(np.sort(other.reshape(64, -1), axis=0),
                              np.sort(inputs.reshape(64, -1), axis=0))
    # Evaluation reads the images as they are.
    evaluated = np.concatenate([b["input"] for b in test.eval_batches(32)])
    np.testing.assert_array_equal(evaluated, test.inputs)


def test_augmentation_of_flattened_images_flips_rows_of_pixels(monkeypatch):
    _, splits = load_mock("fashion_mnist", monkeypatch, num_examples=40, random_flip=True)
    train = splits["train"]
    assert train.inputs.shape == (40, 784)
    images = train.inputs + np.tile(np.arange(28, dtype=np.float32), 28) * 0.01
    train = batches.Split(images, train.targets, train.augmentation)
    inputs, _ = stack_chunks(train.train_batches(8, seed=0, epoch=0))
    flipped = 0
    for x, index in zip(inputs.reshape(-1, 784), arrays.epoch_order(0, 0, 40)):
        image = images[index].reshape(28, 28)
        same = np.array_equal(x.reshape(28, 28), image)
        mirrored = np.array_equal(x.reshape(28, 28), image[:, ::-1])
        assert same != mirrored
        flipped += mirrored
    assert 5 < flipped < 35


def test_augmentation_needs_images():
    with pytest.raises(ValueError, match="no images"):
        data.load(make_config(dataset="sinreg", input_dim=1, output_dim=1, random_flip=True),
                  seed=0)


# ----------------------------------------------------------------------------- order


def test_epoch_order_deterministic_and_distinct():
    n = 1000
    order = arrays.epoch_order(3, 2, n)
    np.testing.assert_array_equal(np.sort(order), np.arange(n))
    np.testing.assert_array_equal(order, arrays.epoch_order(3, 2, n))
    assert not np.array_equal(order, arrays.epoch_order(4, 2, n))
    assert not np.array_equal(order, arrays.epoch_order(3, 3, n))
    assert arrays.steps_per_epoch(60_000, 128) == 468
    assert arrays.steps_per_epoch(100, 100) == 1


def test_train_batches_same_seed_same_order(mnist):
    train = mnist[1]["train"]
    first = lambda seed: next(train.train_batches(256, seed, 0))["target"]
    np.testing.assert_array_equal(first(0), first(0))
    assert not np.array_equal(first(0), first(1))
    assert not np.array_equal(first(0), next(train.train_batches(256, 0, 1))["target"])


@pytest.mark.parametrize("chunk", [1, 100])
def test_train_batches_equal_in_memory_gather(mnist, chunk):
    train = mnist[1]["train"]
    chunks = list(train.train_batches(128, seed=7, epoch=2, chunk=chunk))
    steps = arrays.steps_per_epoch(len(train), 128)
    sizes = [b["input"].shape[0] for b in chunks]
    assert sizes == [chunk] * (steps // chunk) + ([steps % chunk] if steps % chunk else [])
    for b in chunks:
        assert b["input"].shape[1:] == (128, 784) and b["input"].dtype == np.float32
        assert b["target"].shape[1:] == (128,) and b["target"].dtype == np.int32
    inputs, targets = stack_chunks(chunks)
    want_inputs, want_targets = gather_path(train, 128, seed=7, epoch=2)
    np.testing.assert_array_equal(inputs, want_inputs)
    np.testing.assert_array_equal(targets, want_targets)


def test_train_batches_process_slices(mnist):
    train = mnist[1]["train"]
    kwargs = dict(batch_size=256, seed=5, epoch=1, chunk=10)
    whole = list(itertools.islice(train.train_batches(**kwargs), 3))
    parts = [list(itertools.islice(
        train.train_batches(process_index=p, process_count=2, **kwargs), 3))
        for p in range(2)]
    for g, p0, p1 in zip(whole, *parts):
        assert p0["input"].shape == (10, 128, 784)
        np.testing.assert_array_equal(np.concatenate([p0["input"], p1["input"]], 1), g["input"])
        np.testing.assert_array_equal(np.concatenate([p0["target"], p1["target"]], 1),
                                      g["target"])
    # Disjoint: the two processes never see the same example in an epoch.
    order = arrays.epoch_order(5, 1, len(train))
    steps = arrays.steps_per_epoch(len(train), 256)
    idx = order[:steps * 256].reshape(steps, 256)
    assert not set(idx[:, :128].ravel()) & set(idx[:, 128:].ravel())
    keys = [set(row_keys(batches.Split(p[0]["input"][0], p[0]["target"][0]))) for p in parts]
    assert not keys[0] & keys[1]


def test_train_batches_start_step_skips(mnist):
    train = mnist[1]["train"]
    full_inputs, full_targets = stack_chunks(train.train_batches(500, 1, 4))
    for chunk in (1, 7):
        inputs, targets = stack_chunks(
            train.train_batches(500, 1, 4, start_step=5, chunk=chunk))
        np.testing.assert_array_equal(inputs, full_inputs[5:])
        np.testing.assert_array_equal(targets, full_targets[5:])
    steps = arrays.steps_per_epoch(len(train), 500)
    assert list(train.train_batches(500, 1, 4, start_step=steps)) == []


def test_train_batches_rejects_bad_arguments(mnist):
    train = mnist[1]["train"]
    with pytest.raises(ValueError, match="^batch_size=129"):
        train.train_batches(129, 0, 0, process_count=2)
    with pytest.raises(ValueError, match="exceeds"):
        train.train_batches(100_000, 0, 0)
    with pytest.raises(ValueError, match="start_step"):
        train.train_batches(128, 0, 0, start_step=10_000)


# ----------------------------------------------------------------------------- eval


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_batches_every_example_once(mnist, process_count):
    test = mnist[1]["test"]
    per_process = [list(test.eval_batches(384, process_index=p,
                                             process_count=process_count))
                   for p in range(process_count)]
    assert len(per_process[0]) == -(-10_000 // 384)
    # Reassemble the global batches from the processes' rows.
    global_batches = [{k: np.concatenate([b[k] for b in bs]) for k in bs[0]}
                      for bs in zip(*per_process)]
    for b in global_batches:
        assert b["input"].shape == (384, 784) and b["mask"].shape == (384,)
        assert b["mask"].dtype == np.float32 and b["input"].dtype == np.float32
    mask = np.concatenate([b["mask"] for b in global_batches])
    inputs = np.concatenate([b["input"] for b in global_batches])
    targets = np.concatenate([b["target"] for b in global_batches])
    assert int(mask.sum()) == 10_000 and set(np.unique(mask)) == {0.0, 1.0}
    real = mask == 1
    np.testing.assert_array_equal(inputs[real], test.inputs)
    np.testing.assert_array_equal(targets[real], test.targets)
    assert not inputs[~real].any()


# ----------------------------------------------------------------------------- synthetic


@pytest.mark.parametrize("hidden,activation", [((), "identity"), ((16, 8), "tanh")])
def test_teacher_targets(hidden, activation):
    config = make_config(dataset="teacher", teacher_hidden_layers=hidden,
                         teacher_activation=activation, val_split=0.2)
    info, splits = data.load(config, seed=3)
    assert info == data.DatasetInfo("regression", (8,), 3)
    assert len(splits["train"]) == 800 and len(splits["validation"]) == 200
    assert len(splits["test"]) == 300
    teacher = data.TeacherNetwork(hidden, 3, activation)
    params = teacher.init(jax.random.key(3), jnp.zeros((1, 8)))
    for split in splits.values():
        assert split.inputs.dtype == np.float32 and split.targets.dtype == np.float32
        assert split.targets.shape == (len(split), 3)
        assert np.all(np.abs(split.inputs) <= 1.0)
        with jax.default_matmul_precision("highest"):
            want = np.asarray(teacher.apply(params, split.inputs))
        np.testing.assert_allclose(split.targets, want, rtol=1e-5, atol=1e-5)
    if not hidden:  # A linear teacher is y = x W + b with the seeded parameters.
        dense = params["params"]["Dense_0"]
        x = splits["test"].inputs.astype(np.float64)
        want = x @ np.asarray(dense["kernel"], np.float64) + np.asarray(dense["bias"])
        np.testing.assert_allclose(splits["test"].targets, want, rtol=1e-5, atol=1e-5)
    # Train and test are different draws of the same distribution; the seed fixes both.
    assert not np.array_equal(splits["train"].inputs[:300], splits["test"].inputs)
    _, again = data.load(config, seed=3)
    np.testing.assert_array_equal(again["test"].targets, splits["test"].targets)
    _, other = data.load(config, seed=4)
    assert not np.array_equal(other["test"].inputs, splits["test"].inputs)


def test_sinreg():
    info, splits = data.load(make_config(dataset="sinreg", input_dim=1, output_dim=1), seed=0)
    assert info == data.DatasetInfo("regression", (1,), 1)
    for split, size in ((splits["train"], 1000), (splits["test"], 300)):
        assert split.inputs.shape == split.targets.shape == (size, 1)
        assert split.inputs.dtype == split.targets.dtype == np.float32
        assert np.all(np.abs(split.inputs) <= np.pi)
        assert np.max(np.abs(split.targets - np.sin(split.inputs.astype(np.float64)))) < 1e-6
    assert split.inputs.min() < -3 and split.inputs.max() > 3
    with pytest.raises(ValueError, match="input_dim"):
        data.load(make_config(dataset="sinreg", input_dim=2, output_dim=1), seed=0)


def test_synthetic_train_batches_equal_gather():
    _, splits = data.load(make_config(dataset="teacher"), seed=0)
    inputs, targets = stack_chunks(splits["train"].train_batches(64, 2, 0, chunk=4))
    want_inputs, want_targets = gather_path(splits["train"], 64, 2, 0)
    assert targets.shape == (15, 64, 3)
    np.testing.assert_array_equal(inputs, want_inputs)
    np.testing.assert_array_equal(targets, want_targets)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_missing_data_dir_fails_promptly(tmp_path, name):
    config = make_config(dataset=name, data_dir=str(tmp_path))
    config.download = False
    start = time.monotonic()
    with pytest.raises(data.DataNotFoundError) as excinfo:
        data.load(config, seed=0)
    assert time.monotonic() - start < 10
    message = str(excinfo.value)
    assert str(tmp_path) in message and name in message
    assert "data.data_dir" in message and "TFDS_DATA_DIR" in message


def test_network_probe_times_out_quickly():
    start = time.monotonic()
    reachable, why = data._can_reach(("bioflax-test.invalid", 443), 0.5)  # never resolves
    assert not reachable and why is not None
    assert time.monotonic() - start < 2


def test_corrupt_data_gives_clear_error(tmp_path):
    source = pathlib.Path(os.environ.get("TFDS_DATA_DIR", "")) / "mnist" / "3.0.1"
    if not source.is_dir():
        pytest.skip("no prepared MNIST in TFDS_DATA_DIR to corrupt")
    target = tmp_path / "mnist" / "3.0.1"
    target.mkdir(parents=True)
    for f in source.iterdir():
        if f.name.startswith("mnist-train"):  # keep the first 100 kB only
            (target / f.name).write_bytes(f.read_bytes()[:100_000])
        else:
            shutil.copyfile(f, target / f.name)
    with pytest.raises(data.DataNotFoundError, match="truncated or corrupt") as excinfo:
        data.load(make_config(data_dir=str(tmp_path)), seed=0)
    assert excinfo.value.__cause__ is not None
    assert str(target) in str(excinfo.value)


def test_bad_dataset_name():
    with pytest.raises(ValueError, match=r"data\.dataset 'cifar'.*mnist.*cifar10.*teacher"):
        data.load(make_config(dataset="cifar"), seed=0)


@pytest.mark.parametrize("val_split", [-0.1, 1.0])
def test_bad_val_split(val_split):
    with pytest.raises(ValueError, match=r"data\.val_split"):
        data.load(make_config(dataset="sinreg", input_dim=1, output_dim=1,
                              val_split=val_split), seed=0)


def test_check_batch_size():
    arrays.check_batch_size(128, 8)
    arrays.check_batch_size(128, 1)
    with pytest.raises(ValueError, match=r"^batch_size=100.*8.*batch_size=96"):
        arrays.check_batch_size(100, 8)
    with pytest.raises(ValueError, match=r"^eval_batch_size=100"):
        arrays.check_batch_size(100, 8, name="eval_batch_size")


# ----------------------------------------------------------------------------- prefetch


def test_prefetch_keeps_order_and_runs_at_most_size_ahead():
    produced = []

    def items():
        for i in range(10):
            produced.append(i)
            yield i

    fetched = arrays.prefetch(items(), lambda i: i * i, size=2)
    assert next(fetched) == 0
    time.sleep(0.5)  # the thread fills the queue (2 items) and holds a third, ready to put
    assert len(produced) <= 4
    assert list(fetched) == [i * i for i in range(1, 10)]


def test_prefetch_raises_the_threads_error_and_stops_when_closed():
    def failing():
        yield 1
        raise OSError("disk gone")

    fetched = arrays.prefetch(failing())
    assert next(fetched) == 1
    with pytest.raises(OSError, match="disk gone"):
        next(fetched)
    before = {t for t in threading.enumerate() if t.name == "bioflax-prefetch"}
    endless = arrays.prefetch(itertools.count(), size=1)
    assert next(endless) == 0
    endless.close()
    assert {t for t in threading.enumerate() if t.name == "bioflax-prefetch"} == before


def test_train_batches_num_steps_stops_early(mnist):
    train = mnist[1]["train"]
    full, _ = stack_chunks(train.train_batches(500, 1, 4))
    part, _ = stack_chunks(train.train_batches(500, 1, 4, start_step=3, num_steps=8,
                                              chunk=3))
    np.testing.assert_array_equal(part, full[3:11])
    with pytest.raises(ValueError, match="num_steps"):
        train.train_batches(500, 1, 4, start_step=110, num_steps=20)


# ----------------------------------------------------------------------------- streaming


@pytest.fixture(scope="module")
def streamed():
    return data.load(make_config(streaming=True), seed=0)


def test_streamed_mnist_reads_every_training_example_once_per_epoch(mnist, streamed):
    info, splits = streamed
    assert info == mnist[0] and set(splits) == {"train", "test"}
    train = splits["train"]
    assert isinstance(train, batches.StreamedSplit) and len(train) == 60_000
    inputs, targets = stack_chunks(train.train_batches(500, seed=2, epoch=0, chunk=40))
    assert inputs.shape == (120, 500, 784) and targets.shape == (120, 500)
    # The same values as the in-memory path: the same normalisation, every example once.
    read = batches.Split(inputs.reshape(-1, 784), targets.ravel())
    assert collections.Counter(row_keys(read)) == collections.Counter(row_keys(mnist[1]["train"]))
    assert not np.array_equal(targets.ravel(), mnist[1]["train"].targets)  # shuffled

    # A pure function of (seed, epoch): the same batches again, from any start step.
    again, _ = stack_chunks(train.train_batches(500, seed=2, epoch=0, start_step=7,
                                               num_steps=5, chunk=2))
    np.testing.assert_array_equal(again, inputs[7:12])
    other, _ = stack_chunks(train.train_batches(500, seed=2, epoch=1, num_steps=2))
    assert not np.array_equal(other, inputs[:2])


def test_streamed_mnist_processes_read_disjoint_shards(mnist, streamed):
    train = streamed[1]["train"]
    parts = [stack_chunks(train.train_batches(500, 0, 0, chunk=60, process_index=p,
                                             process_count=2)) for p in range(2)]
    keys = [set(row_keys(batches.Split(x.reshape(-1, 784), y.ravel()))) for x, y in parts]
    assert parts[0][0].shape == (120, 250, 784)
    assert not keys[0] & keys[1]
    assert keys[0] | keys[1] == set(row_keys(mnist[1]["train"]))


@pytest.mark.parametrize("process_count", [1, 3])
def test_streamed_evaluation_reads_every_example_once_in_order(mnist, streamed, process_count):
    test = streamed[1]["test"]
    assert len(test) == 10_000  # one process here
    real = []
    for p in range(process_count):
        local = list(test.eval_batches(3 * 128, process_index=p,
                                          process_count=process_count))
        assert len(local) == math.ceil(math.ceil(10_000 / process_count) / (384 // process_count))
        for b in local:
            keep = b["mask"] > 0
            assert not b["input"][~keep].any()
            real.append((b["input"][keep], b["target"][keep]))
    inputs = np.concatenate([x for x, _ in real])
    np.testing.assert_array_equal(inputs, mnist[1]["test"].inputs)
    np.testing.assert_array_equal(np.concatenate([y for _, y in real]),
                                  mnist[1]["test"].targets)


def test_streamed_validation_is_the_end_of_the_training_split(mnist):
    _, splits = data.load(make_config(streaming=True, val_split=0.1), seed=0)
    assert len(splits["train"]) == 54_000 and len(splits["validation"]) == 6_000
    head = splits["validation"].head(6_000)
    np.testing.assert_array_equal(head.inputs, mnist[1]["train"].inputs[54_000:])
    np.testing.assert_array_equal(head.targets, mnist[1]["train"].targets[54_000:])
