"""MNIST training examples per second delivered by the experiment's two batch paths.

(a) ``Split.train_batches`` (tf.data: index order -> batch -> tf.gather -> prefetch), one
    full epoch at the given batch size, chunk 1 and chunk 100;
(b) the in-memory gather path the trainer uses: a NumPy gather per batch on the host, and
    one JAX gather of a whole epoch from the training set held on the default device.

Each figure is the median of ``--runs`` runs (different epochs). Usage:

    python benchmarks/data_throughput.py [--data_dir /path/to/tensorflow_datasets]
"""

import argparse
import os
import pathlib
import statistics
import sys
import time

try:
    from bioflax.experiment import datasets as data
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from bioflax.experiment import datasets as data
from bioflax.trainer import arrays

import jax
import jax.numpy as jnp
import ml_collections


def mnist_config(data_dir):
    return ml_collections.ConfigDict(dict(
        dataset="mnist", data_dir=data_dir, batch_size=128, eval_batch_size=1000,
        val_split=0.0, normalize_mean=0.1307, normalize_std=0.3081))


def median_rate(fn, runs):
    """Median examples/s of ``fn(run) -> examples`` over ``runs`` runs."""
    rates = []
    for run in range(runs):
        start = time.perf_counter()
        examples = fn(run)
        rates.append(examples / (time.perf_counter() - start))
    return statistics.median(rates), rates


def report(name, result):
    median, rates = result
    runs = ", ".join(f"{r:,.0f}" for r in rates)
    print(f"{name:<46s} {median:>14,.0f} examples/s  (runs: {runs})", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", default=None,
                        help="TFDS data dir holding mnist (default: TFDS_DATA_DIR / TFDS default)")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    if args.data_dir is None and "TFDS_DATA_DIR" not in os.environ:
        shared = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "tensorflow_datasets"
        if shared.is_dir():
            args.data_dir = str(shared)

    start = time.perf_counter()
    _, splits = data.load(mnist_config(args.data_dir), seed=0)
    train = splits["train"]
    batch = args.batch_size
    steps = arrays.steps_per_epoch(len(train), batch)
    per_epoch = steps * batch
    print(f"MNIST train: {len(train)} examples, batch {batch}, {steps} steps/epoch "
          f"({per_epoch} examples); loaded in {time.perf_counter() - start:.1f} s; "
          f"JAX device: {jax.devices()[0].device_kind}", flush=True)

    # (a) tf.data pipeline, whole epoch, pipeline construction included.
    for chunk in (1, 100):
        def tfdata_epoch(run, chunk=chunk):
            n = 0
            for b in train.train_batches(batch, seed=0, epoch=run, chunk=chunk):
                n += b["input"].shape[0] * b["input"].shape[1]
            assert n == per_epoch
            return n
        report(f"tf.data train_batches chunk={chunk}", median_rate(tfdata_epoch, args.runs))

    # (b1) NumPy gather of each batch on the host.
    def numpy_epoch(run):
        order = arrays.epoch_order(0, run, len(train))
        for i in range(steps):
            idx = order[i * batch:(i + 1) * batch]
            _ = train.inputs[idx], train.targets[idx]  # the gather is the work measured
        return per_epoch
    report("numpy gather per batch (host)", median_rate(numpy_epoch, args.runs))

    # (b2) JAX gather of a whole epoch from the arrays already on device.
    start = time.perf_counter()
    inputs = jax.device_put(train.inputs)
    targets = jax.device_put(train.targets)
    jax.block_until_ready((inputs, targets))
    print(f"device_put of the training set: {time.perf_counter() - start:.3f} s", flush=True)

    @jax.jit
    def gather_epoch(inputs, targets, idx):
        return jnp.take(inputs, idx, axis=0), jnp.take(targets, idx, axis=0)

    def order_of(run):
        return arrays.epoch_order(0, run, len(train))[:per_epoch].reshape(steps, batch)

    jax.block_until_ready(gather_epoch(inputs, targets, order_of(99)))  # compile

    def jax_epoch(run):
        jax.block_until_ready(gather_epoch(inputs, targets, order_of(run)))
        return per_epoch
    report("jax gather of a whole epoch (device)", median_rate(jax_epoch, args.runs))


if __name__ == "__main__":
    main()
