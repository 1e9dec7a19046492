"""Training examples/s of Flax NNX models in bioflax's Trainer against their Linen twins.

The NNX models are the experiment's (``model.api = 'nnx'``): :class:`bioflax.nnx_zoo.MLP`
784-500-500-10 ReLU (throughput.py's MLP) and :class:`bioflax.nnx_zoo.LeNet5` on 32×32×1
inputs, converted by ``bioflax.convert(model, rule, rngs=..., example=...)`` and trained
through the :class:`bioflax.trainer.nnx_adapter.NnxAdapter` that ``Task`` wraps them in.
Their Linen twins are the same layers written in Linen (``nn.Dense`` layers ``layer_i``;
:class:`bioflax.zoo.LeNet5`) converted by ``bioflax.convert(model, rule)``, so the figures
differ only by the API. LeNet's convolutions run as the LeNet configs run them
(``conv_impl='auto'``, ``bioflax.conv.CPU_COMPILER_OPTIONS``).

Data: MNIST-shaped random examples (speed does not depend on the values), on the device;
batch 128, plain SGD, float32. One figure is one steady-state epoch of ``Trainer.fit``
(compilation excluded); every variant's epochs are interleaved with the others' and each
is reported by the median of ``--repeats`` (3), with the ratio NNX / Linen. The last
column says whether XLA compiled the same training program for both (the optimised HLO
with names and source locations left out): where it did, the ratio's distance from 1 is
the machine's noise.

    python benchmarks/nnx.py [--repeats 3] [--rules bp,fa,dfa] [--examples 60000]
"""

import argparse
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import nnx

import bioflax
from bioflax import losses, nnx_zoo, zoo
from bioflax.conv import CPU_COMPILER_OPTIONS
from bioflax.experiment.input_pipeline import Split
from bioflax.trainer import ClassificationMetrics, InMemory, Task
from bioflax.trainer.programs import plan

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from throughput import EpochTimer, interleaved_rates  # pylint: disable=wrong-import-position

BATCH, WIDTH = 128, 500


class LinenMLP(nn.Module):
    """nnx_zoo.MLP(784, (500, 500), ('relu', 'relu'), 10) in Linen."""

    @nn.compact
    def __call__(self, x):
        for index in range(2):
            x = nn.relu(nn.Dense(WIDTH, name=f"layer_{index}")(x))
        return nn.Dense(10, name="layer_2")(x)


def mlp(api: str, rule: str, example) -> tuple:
    if api == "linen":
        return bioflax.convert(LinenMLP(), rule), None
    model = nnx_zoo.MLP(784, (WIDTH, WIDTH), ("relu", "relu"), 10, rngs=nnx.Rngs(params=0))
    return bioflax.convert(model, rule, rngs=nnx.Rngs(feedback=1), example=example), None


def lenet(api: str, rule: str, example) -> tuple:
    if api == "linen":
        return bioflax.convert(zoo.LeNet5(), rule, conv_impl="auto"), CPU_COMPILER_OPTIONS
    model = bioflax.convert(nnx_zoo.LeNet5(rngs=nnx.Rngs(params=0)), rule, conv_impl="auto",
                            rngs=nnx.Rngs(feedback=1), example=example)
    return model, CPU_COMPILER_OPTIONS


# name -> (builder of (api, rule, example) -> (model, compiler options), one input's shape)
MODELS = {"MLP 784-500-500-10": (mlp, (784,)), "LeNet-5": (lenet, (32, 32, 1))}


def compiled_train_program(timer: EpochTimer) -> list[str]:
    """The instructions of the timer's compiled training chunk, names and source locations
    left out, sorted."""
    trainer, task = timer.trainer, timer.task
    steps = min(trainer.log_every_steps, len(timer.split) // timer.batch)
    data, xs, steps = next(iter(timer.source.chunks(trainer.placement, timer.batch,
                                                    trainer.seeds, 0, 0, steps, steps)))
    text = trainer.programs(task).train_chunk(InMemory).lower(
        plan(task, 0, steps), timer.state, data, xs).compile().as_text()
    for pattern in (r"%[\w.\-]+", r",?\s*(metadata|frontend_attributes)=\{[^}]*\}",
                    r",?\s*stack_frame_id=\d+", r"\.\d+\b"):
        text = re.sub(pattern, "", text)
    return sorted(line.strip() for line in text.splitlines()
                  if " = " in line and not re.match(r"\s*-?\d", line))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per figure")
    parser.add_argument("--rules", default="bp,fa,dfa", help="rules, comma-separated")
    parser.add_argument("--examples", type=int, default=60_000, help="examples per epoch")
    args = parser.parse_args()
    rules = args.rules.split(",")
    device = jax.devices()[0]
    print(f"device: {device.platform} {device.device_kind} x{jax.device_count()}; "
          f"jax {jax.__version__}; batch {BATCH}, SGD, float32, {args.examples:,} examples "
          f"per epoch; median of {args.repeats} interleaved epochs")
    print(f"\n{'model':<19} {'rule':<5} {'Linen ex/s':>11} {'NNX ex/s':>11} {'NNX/Linen':>10} "
          f"{'same program':>13}")
    for name, (build, shape) in MODELS.items():
        rng = np.random.default_rng(0)
        split = Split(rng.standard_normal((args.examples, *shape), dtype=np.float32),
                      rng.integers(0, 10, args.examples).astype(np.int32))
        example = jnp.asarray(split.inputs[:BATCH])
        timers = {}
        for rule in rules:
            for api in ("linen", "nnx"):
                model, options = build(api, rule, example)
                task = Task(module=model, loss=losses.softmax_cross_entropy,
                            optimizer=optax.sgd(0.01), metrics=ClassificationMetrics)
                timers[rule, api] = EpochTimer(task, split, BATCH, compiler_options=options)
        rates = interleaved_rates(timers, args.repeats)
        for rule in rules:
            linen, nnx_rate = rates[rule, "linen"], rates[rule, "nnx"]
            same = (compiled_train_program(timers[rule, "linen"])
                    == compiled_train_program(timers[rule, "nnx"]))
            print(f"{name:<19} {rule:<5} {linen:>11,.0f} {nnx_rate:>11,.0f} "
                  f"{nnx_rate / linen:>9.3f}x {'yes' if same else 'no':>13}", flush=True)


if __name__ == "__main__":
    main()
