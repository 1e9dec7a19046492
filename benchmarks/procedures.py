"""Training examples/s of each procedure beside backprop on the same network, in the
published protocols' configs (``configs/paper/``): weight mirrors and BP on Akrout et al.'s
784-500-10 sigmoid MLP (batch 128), DRTP, DFA, FA and BP on Frenkel et al.'s conv-32c5 +
FC-1000 network (batch 100), PEPITA and BP on Dellaferrera & Kreiman's 784-1024-10 MLP
(batch 64), and Forward-Forward on loeweX's 3 × 1000 network (batch 100), each task built
by ``bioflax.experiment.run.build_task`` as ``main.py`` builds it, the alignment metric
off (it is an extra backprop pass on some steps, the same for every rule).

Data: MNIST-shaped random examples on the device (speed does not depend on the values).
One figure is ``--steps`` steps of ``Trainer.fit`` after a warm-up (compilation excluded);
the variants of one network are timed in interleaved rounds and reported by the median
over ``--repeats`` rounds, with the ratio to BP on that network.

    python benchmarks/procedures.py [--repeats 5] [--steps 200]
"""

import argparse
import importlib.util
import os
import statistics
import sys
import time

import jax
import numpy as np

from bioflax.experiment import datasets, run
from bioflax.trainer import ArrayData, InMemory, Trainer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vit import SilentWriter  # pylint: disable=wrong-import-position

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "configs",
                       "paper")
# network -> (config file, settings; the first is backprop on that network, or None)
NETWORKS = {
    "784-500-10 sigmoid (Akrout)": ("akrout2019.py", ["bp", "wm"]),
    "conv32c5-FC1000 tanh (Frenkel)": ("frenkel2021.py", ["bp", "drtp", "dfa", "fa"]),
    "784-1024-10 ReLU (Dellaferrera)": ("dellaferrera2022.py", ["bp", "pepita"]),
    "3x1000 ReLU (loeweX's FF)": ("hinton2022.py", [None, "classifier"]),
}
NUM_EXAMPLES = 12_800


def config_of(file: str, setting: str):
    spec = importlib.util.spec_from_file_location(file[:-3], os.path.join(CONFIGS, file))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(setting)
    config.alignment.enabled = False
    return config


class StepTimer:
    """A config's task through its own trainer, compiled and warmed up; each call trains
    ``steps`` more steps and returns their examples/s."""

    def __init__(self, config, source, steps: int):
        info = datasets.DatasetInfo("classification", (28, 28, 1), 10)
        self.task = run.build_task(config, info, 0, source.sample_input())
        self.batch, self.steps, self.source = config.data.batch_size, steps, source
        self.trainer = Trainer(max_epochs=1, limit_train_batches=steps,
                               log_every_steps=min(steps, 100), console=False,
                               report_progress=False, writer=SilentWriter(),
                               compiler_options=config.compiler_options.to_dict())
        self.state = self.trainer.init_state(self.task, source.sample_input(),
                                             config.training.epochs * steps)
        self.state = self._fit()

    def _fit(self):
        return self.trainer.fit(self.task, self.source, batch_size=self.batch,
                                state=self.state).state

    def __call__(self) -> float:
        self.trainer.max_epochs += 1  # one "epoch" is `steps` steps (limit_train_batches)
        start = time.perf_counter()
        self.state = jax.block_until_ready(self._fit())
        return self.steps * self.batch / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per figure")
    parser.add_argument("--steps", type=int, default=200, help="steps per timed round")
    args = parser.parse_args()
    device = jax.devices()[0]
    print(f"device: {device.platform} {device.device_kind} x{jax.device_count()}; "
          f"jax {jax.__version__}; {args.steps} steps per round, median of {args.repeats} "
          "interleaved rounds")
    rng = np.random.default_rng(0)
    source = InMemory(ArrayData(rng.random((NUM_EXAMPLES, 28, 28, 1), dtype=np.float32),
                                rng.integers(0, 10, NUM_EXAMPLES).astype(np.int32)))
    print(f"\n{'network':<32} {'procedure':<11} {'examples/s':>11} {'÷ BP':>7}")
    for network, (file, settings) in NETWORKS.items():
        timers = {setting: StepTimer(config_of(file, setting), source, args.steps)
                  for setting in settings if setting is not None}
        rates: dict[str, list[float]] = {setting: [] for setting in timers}
        for _ in range(args.repeats):
            for setting, timer in timers.items():
                rates[setting].append(timer())
        median = {setting: statistics.median(values) for setting, values in rates.items()}
        for setting, rate in median.items():
            ratio = f"{rate / median[settings[0]]:.2f}x" if settings[0] else "—"
            print(f"{network:<32} {setting:<11} {rate:>11,.0f} {ratio:>7}", flush=True)


if __name__ == "__main__":
    main()
