"""Tests of bioflax.data on real MNIST (the offline TFDS copy, see conftest.py) and on the
synthetic teacher-student and sine tasks."""

import collections
import itertools
import os
import pathlib
import shutil
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from bioflax import data
from bioflax import models


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


def row_keys(split: data.Split) -> list[bytes]:
    """One hashable key per example (its input and target bytes)."""
    return [x.tobytes() + y.tobytes() for x, y in zip(split.inputs, split.targets)]


def gather_path(split: data.Split, batch_size: int, seed: int, epoch: int):
    """The trainer's in-memory fast path: all global batches of an epoch, stacked."""
    order = data.epoch_order(seed, epoch, len(split))
    steps = data.steps_per_epoch(len(split), batch_size)
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
    assert info.task == data.DATASET_TASKS["mnist"]
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
    monkeypatch.setattr(data, "_load_mnist", lambda cfg: (mnist[0], full, mnist[1]["test"]))
    _, b = data.load(make_config(val_split=0.1), seed=0)
    _, c = data.load(make_config(val_split=0.1), seed=1)
    for name in ("train", "validation"):
        np.testing.assert_array_equal(a[name].inputs, b[name].inputs)
        np.testing.assert_array_equal(a[name].targets, b[name].targets)
    assert set(row_keys(c["validation"])) != set(val_keys)


# ----------------------------------------------------------------------------- order


def test_epoch_order_deterministic_and_distinct():
    n = 1000
    order = data.epoch_order(3, 2, n)
    np.testing.assert_array_equal(np.sort(order), np.arange(n))
    np.testing.assert_array_equal(order, data.epoch_order(3, 2, n))
    assert not np.array_equal(order, data.epoch_order(4, 2, n))
    assert not np.array_equal(order, data.epoch_order(3, 3, n))
    assert data.steps_per_epoch(60_000, 128) == 468
    assert data.steps_per_epoch(100, 100) == 1


def test_train_batches_same_seed_same_order(mnist):
    train = mnist[1]["train"]
    first = lambda seed: next(data.train_batches(train, 256, seed, 0))["target"]
    np.testing.assert_array_equal(first(0), first(0))
    assert not np.array_equal(first(0), first(1))
    assert not np.array_equal(first(0), next(data.train_batches(train, 256, 0, 1))["target"])


@pytest.mark.parametrize("chunk", [1, 100])
def test_train_batches_equal_in_memory_gather(mnist, chunk):
    train = mnist[1]["train"]
    batches = list(data.train_batches(train, 128, seed=7, epoch=2, chunk=chunk))
    steps = data.steps_per_epoch(len(train), 128)
    sizes = [b["input"].shape[0] for b in batches]
    assert sizes == [chunk] * (steps // chunk) + ([steps % chunk] if steps % chunk else [])
    for b in batches:
        assert b["input"].shape[1:] == (128, 784) and b["input"].dtype == np.float32
        assert b["target"].shape[1:] == (128,) and b["target"].dtype == np.int32
    inputs, targets = stack_chunks(batches)
    want_inputs, want_targets = gather_path(train, 128, seed=7, epoch=2)
    np.testing.assert_array_equal(inputs, want_inputs)
    np.testing.assert_array_equal(targets, want_targets)


def test_train_batches_process_slices(mnist):
    train = mnist[1]["train"]
    kwargs = dict(global_batch_size=256, seed=5, epoch=1, chunk=10)
    whole = list(itertools.islice(data.train_batches(train, **kwargs), 3))
    parts = [list(itertools.islice(
        data.train_batches(train, process_index=p, process_count=2, **kwargs), 3))
        for p in range(2)]
    for g, p0, p1 in zip(whole, *parts):
        assert p0["input"].shape == (10, 128, 784)
        np.testing.assert_array_equal(np.concatenate([p0["input"], p1["input"]], 1), g["input"])
        np.testing.assert_array_equal(np.concatenate([p0["target"], p1["target"]], 1),
                                      g["target"])
    # Disjoint: the two processes never see the same example in an epoch.
    order = data.epoch_order(5, 1, len(train))
    steps = data.steps_per_epoch(len(train), 256)
    idx = order[:steps * 256].reshape(steps, 256)
    assert not set(idx[:, :128].ravel()) & set(idx[:, 128:].ravel())
    keys = [set(row_keys(data.Split(p[0]["input"][0], p[0]["target"][0]))) for p in parts]
    assert not keys[0] & keys[1]


def test_train_batches_start_step_skips(mnist):
    train = mnist[1]["train"]
    full_inputs, full_targets = stack_chunks(data.train_batches(train, 500, 1, 4))
    for chunk in (1, 7):
        inputs, targets = stack_chunks(
            data.train_batches(train, 500, 1, 4, start_step=5, chunk=chunk))
        np.testing.assert_array_equal(inputs, full_inputs[5:])
        np.testing.assert_array_equal(targets, full_targets[5:])
    steps = data.steps_per_epoch(len(train), 500)
    assert list(data.train_batches(train, 500, 1, 4, start_step=steps)) == []


def test_train_batches_rejects_bad_arguments(mnist):
    train = mnist[1]["train"]
    with pytest.raises(ValueError, match="data.batch_size"):
        data.train_batches(train, 129, 0, 0, process_count=2)
    with pytest.raises(ValueError, match="exceeds"):
        data.train_batches(train, 100_000, 0, 0)
    with pytest.raises(ValueError, match="start_step"):
        data.train_batches(train, 128, 0, 0, start_step=10_000)


# ----------------------------------------------------------------------------- eval


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_batches_every_example_once(mnist, process_count):
    test = mnist[1]["test"]
    per_process = [list(data.eval_batches(test, 384, process_index=p,
                                          process_count=process_count))
                   for p in range(process_count)]
    assert len(per_process[0]) == -(-10_000 // 384)
    # Reassemble the global batches from the processes' rows.
    batches = [{k: np.concatenate([b[k] for b in bs]) for k in bs[0]}
               for bs in zip(*per_process)]
    for b in batches:
        assert b["input"].shape == (384, 784) and b["mask"].shape == (384,)
        assert b["mask"].dtype == np.float32 and b["input"].dtype == np.float32
    mask = np.concatenate([b["mask"] for b in batches])
    inputs = np.concatenate([b["input"] for b in batches])
    targets = np.concatenate([b["target"] for b in batches])
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
    teacher = models.TeacherNetwork(hidden, 3, activation)
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
    inputs, targets = stack_chunks(data.train_batches(splits["train"], 64, 2, 0, chunk=4))
    want_inputs, want_targets = gather_path(splits["train"], 64, 2, 0)
    assert targets.shape == (15, 64, 3)
    np.testing.assert_array_equal(inputs, want_inputs)
    np.testing.assert_array_equal(targets, want_targets)


# ----------------------------------------------------------------------------- errors


def test_missing_data_dir_fails_promptly(tmp_path):
    config = make_config(data_dir=str(tmp_path))
    config.download = False
    start = time.monotonic()
    with pytest.raises(data.DataNotFoundError) as excinfo:
        data.load(config, seed=0)
    assert time.monotonic() - start < 10
    message = str(excinfo.value)
    assert str(tmp_path) in message
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
    with pytest.raises(ValueError, match=r"data\.dataset 'cifar'.*mnist.*teacher.*sinreg"):
        data.load(make_config(dataset="cifar"), seed=0)


@pytest.mark.parametrize("val_split", [-0.1, 1.0])
def test_bad_val_split(val_split):
    with pytest.raises(ValueError, match=r"data\.val_split"):
        data.load(make_config(dataset="sinreg", input_dim=1, output_dim=1,
                              val_split=val_split), seed=0)


def test_check_batch_size():
    data.check_batch_size(128, 8)
    data.check_batch_size(128, 1)
    with pytest.raises(ValueError, match=r"data\.batch_size=100.*8"):
        data.check_batch_size(100, 8)
    with pytest.raises(ValueError, match=r"data\.eval_batch_size"):
        data.check_batch_size(100, 8, field="data.eval_batch_size")
