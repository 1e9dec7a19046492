"""Training examples/s of every rule on the real trainer path, beside the machine's ceiling.

MLP 784-W-W-10 ReLU on MNIST-shaped data (60,000 random examples: speed does not depend
on the values), batch 128, plain SGD, float32; steady-state epochs with compilation
excluded, medians of ``--repeats`` epochs (5). Prints, for each rule:

- examples/s of ``Trainer.fit`` (the compiled program ``main.py`` runs), with the data on
  the device and through tf.data, and with alignment metrics every 100 steps;
- the matmul ceiling: the rate that the forward and backward matmuls alone allow here
  (3.1 MFLOP per example at W = 500);
- a plain PyTorch loop of the same network and optimizer, when torch is installed
  (``pip install -r benchmarks/requirements.txt``);
- N KP seeds vmapped in one program (``training.num_seeds``) against one run, whose
  examples/s N separate runs share (``--seeds``, default 1,4);
- how the rate scales with width and batch size.

``--quick`` skips the scaling tables, and the seeds table unless ``--seeds`` is given.

    python benchmarks/throughput.py [--repeats 3] [--quick] [--seeds 1,4,16]
"""

import argparse
import importlib.util
import statistics
import subprocess
import sys
import time

import jax
import numpy as np
import optax

from bioflax import alignment, losses
from bioflax.experiment.input_pipeline import Split, TFData
from bioflax.trainer import ClassificationMetrics, arrays
from bioflax.models import BioNeuralNetwork
from bioflax.trainer import InMemory, Task, Trainer

RULES = ("bp", "fa", "kp", "dfa")


def mnist_shaped(n: int = 60_000, seed: int = 0) -> Split:
    rng = np.random.default_rng(seed)
    return Split(rng.standard_normal((n, 784), dtype=np.float32),
                      rng.integers(0, 10, n).astype(np.int32))


def make_task(rule: str, width: int, alignment_every: int = 0) -> Task:
    return Task(module=BioNeuralNetwork((width, width), ("relu", "relu"), 10, rule),
                loss=losses.softmax_cross_entropy, optimizer=optax.sgd(0.01),
                metrics=ClassificationMetrics,
                step_metrics=[alignment.Alignment(alignment_every)] if alignment_every else [])


class SilentWriter:
    """Takes the trainer's metrics and writes nothing (no TensorFlow needed)."""

    def write_scalars(self, step, scalars):
        del step, scalars

    def flush(self):
        pass


class EpochTimer:
    """A trainer and task, compiled and warmed up, that times one more epoch per call."""

    def __init__(self, task: Task, split: Split, batch: int, in_memory: bool = True,
                 num_seeds: int = 1, compiler_options: dict | None = None):
        self.task, self.split, self.batch, self.num_seeds = task, split, batch, num_seeds
        self.source = (InMemory if in_memory else TFData)(split)
        self.trainer = Trainer(max_epochs=1, log_every_steps=100, console=False,
                               report_progress=False, writer=SilentWriter(),
                               num_seeds=num_seeds, compiler_options=compiler_options)
        self.state = self.trainer.fit(task, self.source, batch_size=batch).state
        self.rates: list[float] = []

    def time_epoch(self) -> None:
        self.trainer.max_epochs += 1
        start = time.perf_counter()
        self.state = self.trainer.fit(self.task, self.source, batch_size=self.batch,
                                      state=self.state).state
        jax.block_until_ready(self.state)
        examples = arrays.steps_per_epoch(len(self.split), self.batch) * self.batch * self.num_seeds
        self.rates.append(examples / (time.perf_counter() - start))

    @property
    def rate(self) -> float:
        return statistics.median(self.rates)


def interleaved_rates(timers: dict, repeats: int) -> dict[str, float]:
    """Median examples/s of each timer, its epochs interleaved with the others' so that a
    machine that slows down or speeds up affects every figure alike."""
    for _ in range(repeats):
        for timer in timers.values():
            timer.time_epoch()
    return {name: timer.rate for name, timer in timers.items()}


def trainer_rate(task: Task, split: Split, batch: int, repeats: int) -> float:
    return interleaved_rates({"": EpochTimer(task, split, batch)}, repeats)[""]


def flops_per_example(widths) -> int:
    """Forward, input-gradient and weight-gradient matmuls (no input gradient for layer 1)."""
    pairs = list(zip(widths[:-1], widths[1:]))
    return sum(6 * a * b for a, b in pairs) - 2 * pairs[0][0] * pairs[0][1]


def matmul_ceiling(widths, batch: int, repeats: int) -> float:
    """examples/s that XLA's float32 matmuls of the layer shapes allow on this device."""
    key = jax.random.key(0)
    weights = [jax.random.normal(key, (a, b)) * 0.01 for a, b in zip(widths[:-1], widths[1:])]
    x = jax.random.normal(key, (batch, widths[0]))
    steps = 200

    @jax.jit
    def run(weights, x):
        def body(_, carry):
            weights, x = carry
            h, inputs = x, []
            for w in weights:
                inputs.append(h)
                h = h @ w
            g, new = h, []
            for i in reversed(range(len(weights))):
                new.append(weights[i] - 1e-6 * (inputs[i].T @ g))
                if i:
                    g = g @ weights[i].T
            return new[::-1], x + 1e-6 * g.sum()
        return jax.lax.fori_loop(0, steps, body, (weights, x))

    jax.block_until_ready(run(weights, x))
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run(weights, x))
        seconds.append(time.perf_counter() - start)
    return steps * batch / statistics.median(seconds)


def torch_rate(split: Split, width: int, batch: int, repeats: int):
    """A plain PyTorch loop of the same MLP and SGD, or None without torch."""
    try:
        import torch  # pylint: disable=import-outside-toplevel
    except ImportError:
        return None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = torch.nn.Sequential(torch.nn.Linear(784, width), torch.nn.ReLU(),
                                torch.nn.Linear(width, width), torch.nn.ReLU(),
                                torch.nn.Linear(width, 10)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = torch.nn.CrossEntropyLoss()
    x = torch.from_numpy(split.inputs).to(device)
    y = torch.from_numpy(split.targets.astype(np.int64)).to(device)
    steps = len(split) // batch

    def epoch(seed):
        order = torch.from_numpy(arrays.epoch_order(0, seed, len(split))).to(device)
        for i in range(steps):
            idx = order[i * batch:(i + 1) * batch]
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(x[idx]), y[idx]).backward()
            optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()

    epoch(0)
    seconds = []
    for seed in range(repeats):
        start = time.perf_counter()
        epoch(seed + 1)
        seconds.append(time.perf_counter() - start)
    return steps * batch / statistics.median(seconds), f"{torch.__version__} on {device}"


def torch_rate_in_subprocess(width: int, batch: int, repeats: int):
    command = [sys.executable, __file__, "--torch_only", "--repeats", str(repeats)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"the PyTorch reference failed:\n{result.stderr[-2000:]}")
    line = result.stdout.strip().splitlines()[-1]
    if line == "none":
        return None
    rate, version = line.split(" ", 1)
    return float(rate), version


def seeds_table(split: Split, width: int, batch: int, repeats: int,
                counts: list[int]) -> None:
    """examples/s of N KP seeds vmapped in one program, all seeds' examples counted,
    against one run's (which N runs one after another share), interleaved."""
    rates = interleaved_rates({n: EpochTimer(make_task("kp", width), split, batch, num_seeds=n)
                               for n in sorted({1, *counts})}, repeats)
    print(f"\nKP seeds vmapped in one program (training.num_seeds), median of {repeats} "
          f"epochs:\n{'seeds':>5} {'ex/s in all':>12} {'vs N separate runs':>19}")
    for n, rate in rates.items():
        print(f"{n:>5} {rate:>12,.0f} {rate / rates[1]:>18.2f}x")


def seed_counts(text: str) -> list[int]:
    """``--seeds``: positive integers separated by commas."""
    error = argparse.ArgumentTypeError(f"{text!r}: give positive integers such as 1,4,16")
    try:
        counts = sorted({int(n) for n in text.split(",")})
    except ValueError:
        raise error from None
    if counts[0] < 1:
        raise error
    return counts


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed epochs per figure")
    parser.add_argument("--quick", action="store_true",
                        help="skip the width and batch scaling tables (and the seeds "
                        "table unless --seeds is given)")
    parser.add_argument("--seeds", type=seed_counts, default=None,
                        help="comma-separated numbers of vmapped seeds to time against one "
                        "run (default 1,4; 1 is always timed)")
    parser.add_argument("--torch_only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.torch_only:
        result = torch_rate(mnist_shaped(), 500, 128, args.repeats)
        print("none" if result is None else f"{result[0]} {result[1]}")
        return

    split = mnist_shaped()
    has_tensorflow = importlib.util.find_spec("tensorflow") is not None
    width, batch, repeats = 500, 128, args.repeats
    device = jax.devices()[0]
    print(f"device: {device.platform} {device.device_kind} x{jax.device_count()}; "
          f"jax {jax.__version__}; MLP 784-{width}-{width}-10 ReLU, batch {batch}, SGD, "
          f"float32; median of {repeats} epochs")
    ceiling = matmul_ceiling((784, width, width, 10), batch, repeats)
    print(f"matmul ceiling: {ceiling:,.0f} ex/s "
          f"({ceiling * flops_per_example((784, width, width, 10)) / 1e9:.0f} GFLOP/s)")
    timers = {}
    for rule in RULES:
        timers[rule] = EpochTimer(make_task(rule, width), split, batch)
        timers[f"{rule} aligned"] = EpochTimer(make_task(rule, width, alignment_every=100),
                                               split, batch)
    measured = interleaved_rates(timers, repeats)
    del timers
    # tf.data after the in-memory figures: its thread pools stay busy between epochs.
    if has_tensorflow:
        measured.update(interleaved_rates(
            {f"{rule} tf.data": EpochTimer(make_task(rule, width), split, batch,
                                           in_memory=False) for rule in RULES}, repeats))
    rows = {rule: (measured[rule], measured.get(f"{rule} tf.data", float("nan")),
                   measured[f"{rule} aligned"]) for rule in RULES}
    # PyTorch in a process of its own, where no JAX or TensorFlow threads compete with it.
    torch_result = torch_rate_in_subprocess(width, batch, repeats)
    if torch_result:
        print(f"plain PyTorch {torch_result[1]} loop: {torch_result[0]:,.0f} ex/s")
    else:
        print("plain PyTorch loop: torch not installed (pip install -r benchmarks/requirements.txt)")
    print(f"\n{'rule':<5} {'in-memory':>11} {'tf.data':>11} {'+alignment':>11} "
          f"{'vs BP':>6} {'align cost':>10} {'vs ceiling':>10} {'vs torch':>9}")
    for rule, (memory, tfdata, aligned) in rows.items():
        vs_torch = f"{memory / torch_result[0]:.2f}x" if torch_result else "-"
        print(f"{rule:<5} {memory:>11,.0f} {tfdata:>11,.0f} {aligned:>11,.0f} "
              f"{memory / rows['bp'][0]:>5.2f}x {100 * (memory / aligned - 1):>9.1f}% "
              f"{memory / ceiling:>9.2f}x {vs_torch:>9}")

    if args.seeds or not args.quick:
        seeds_table(split, width, batch, repeats, args.seeds or [1, 4])
    if args.quick:
        return
    small = Split(split.inputs[:8192], split.targets[:8192])  # wide nets are slow here
    print("\nwidth scaling (KP, batch 128, 8,192 examples): width, ex/s, fraction of that "
          "width's matmul ceiling")
    for w in (256, 512, 1024, 2048, 4096):
        rate = trainer_rate(make_task("kp", w), small, batch, 1)
        print(f"  {w:>5} {rate:>11,.0f} {rate / matmul_ceiling((784, w, w, 10), batch, 1):.2f}")
    print("batch scaling (KP, width 500, 8,192 examples): batch, ex/s")
    for b in (32, 64, 128, 256, 512, 1024):
        print(f"  {b:>5} {trainer_rate(make_task('kp', width), small, b, 1):>11,.0f}")


if __name__ == "__main__":
    main()
