"""Training steps/s of one process with 4 CPU devices against 2 processes with 2 each.

Both run ``main.py`` on the same config and global batch (default: the Kolen-Pollack MNIST
MLP, 784-500-500-10, batch 128, in-memory data), the two-process run through
``python -m bioflax.launch``. The rate is read from the wall times of the TensorBoard
``train/loss`` events, from the first logged interval to the last, so that start-up and
compilation are left out. The two layouts alternate, ``--runs`` times each; the medians
are printed. Usage:

    python benchmarks/multiprocess.py [--steps=600] [--runs=3] [--config=configs/kp_mnist.py]
"""

import argparse
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

from tensorboard.backend.event_processing import event_accumulator

REPO = pathlib.Path(__file__).resolve().parents[1]


def steady_rate(workdir: str) -> float:
    """Steps/s between the first and the last ``train/loss`` event of ``workdir``."""
    accumulator = event_accumulator.EventAccumulator(
        workdir, size_guidance={event_accumulator.TENSORS: 0})
    accumulator.Reload()
    events = accumulator.Tensors("train/loss")
    first, last = events[0], events[-1]
    return (last.step - first.step) / (last.wall_time - first.wall_time)


def run(layout: str, config: str, steps: int, root: str) -> float:
    workdir = tempfile.mkdtemp(prefix=f"{layout}_", dir=root)
    command = [str(REPO / "main.py"), f"--config={config}", f"--workdir={workdir}",
               "--config.training.epochs=1", f"--config.training.limit_train_batches={steps}",
               "--config.training.log_every_steps=100", "--config.alignment.every_steps=100",
               "--config.plots=False"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if layout == "1x4":
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
        command = [sys.executable, *command]
    else:
        command = [sys.executable, "-m", "bioflax.launch", "--processes=2",
                   "--devices-per-process=2", "--", *command]
    subprocess.run(command, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return steady_rate(workdir)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "kp_mnist.py"))
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    rates = {"1x4": [], "2x2": []}
    with tempfile.TemporaryDirectory() as root:
        for _ in range(args.runs):
            for layout, measured in rates.items():
                measured.append(run(layout, args.config, args.steps, root))
                print(f"{layout}: {measured[-1]:.1f} steps/s", flush=True)
    one, two = statistics.median(rates["1x4"]), statistics.median(rates["2x2"])
    print(f"1 process x 4 devices: {one:.1f} steps/s; 2 processes x 2 devices: {two:.1f} "
          f"steps/s ({two / one:.2f}x), medians of {args.runs} runs")


if __name__ == "__main__":
    main()
