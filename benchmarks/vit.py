"""Training examples/s of the zoo's Vision Transformer, every rule, beside a plain PyTorch loop.

The network is ``bioflax.zoo.VisionTransformer`` (``vit_mnist``: its docstring gives the
patch size, depth, width, heads and MLP ratio) with its default fields and Xavier-uniform
weights, on MNIST-shaped data: 60,000 random 28×28×1 examples and labels (speed does not
depend on the values), batch 128, float32.

Flax side: the path ``main.py --config=configs/vit_mnist.py:RULE`` trains, built from that
config by ``bioflax.experiment.run.build_task``: the model converted by ``bioflax.convert``
(Xavier-uniform feedback, ``conv_impl='auto'``), softmax cross-entropy, the config's
optimizer (Adam with linear warm-up and cosine decay over the config's epochs), the
classification metrics, the config's XLA options; the alignment metric only with
``--alignment`` (then on every 100th step of a round, counted from its first, as the config
measures it; the unconverted variant below has none). It runs through
``Trainer.fit`` with the data on the device (``InMemory``): one round is ``--steps`` (100)
more steps, in the compiled chunks the trainer runs (``log_every_steps`` at most 100), each
batch gathered on the device from the epoch's order; ``fit`` waits for the last chunk's
results. Variants: ``bioflax RULE`` for each rule of ``--rules`` (default every rule of
``bioflax.rules.RULES`` but ``interpolate_fa_bp``), and ``flax ViT, unconverted``: the
zoo's model itself through the same trainer, to show what the converter costs under BP.

Peer, when ``--peer-python`` names an interpreter with torch (a separate venv: torch is not
a dependency of this project): a plain PyTorch loop of the same ViT, NCHW: ``nn.Conv2d``
patch embedding with stride = patch, a learned class token (zeros) and learned positions
(normal, std 0.02), dropout; pre-LN blocks of ``nn.LayerNorm`` (eps 1e-6, Flax's),
``nn.MultiheadAttention`` (``batch_first``, no attention dropout, as Flax's default;
``need_weights=False``), dropout, residual, ``nn.LayerNorm``, ``nn.Linear`` → tanh-GELU
(Flax's ``nn.gelu``) → ``nn.Linear``, dropout, residual; a final ``nn.LayerNorm`` of the
class token and a ``nn.Linear`` head. Adam (PyTorch's defaults, which are optax's) with
the same learning rate, warm-up and cosine decay (``LambdaLR``, stepped every step),
``CrossEntropyLoss``, the module in training mode; each figure ``--steps`` steps on
batches indexed from a tensor in memory. Its parameter count is printed beside the Flax
model's, and a difference is reported as an error. It runs in a process of its own, driven
round by round so that its rounds interleave with the Flax ones in time.

The variants take turns for ``--repeats`` rounds after one untimed warm-up round each
(compilation excluded); each is reported by its median. The report ends with how far one
variant's rounds lie apart and the share of CPU time the hypervisor took, warns when the
rounds differ by more than 1.25×, and gives the ratios the issue asks for (each rule to
bioflax BP, bioflax BP to PyTorch).

    python benchmarks/vit.py [--peer-python /path/to/python] [--steps 100] [--repeats 3]
"""

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

from lenet import Peers, cpu_times, noise_report, peer_python_ok  # beside this script

BATCH, NUM_EXAMPLES, NUM_CLASSES, IMAGE = 128, 60_000, 10, 28
RULE_NAMES = ("bp", "fa", "kp", "dfa", "usf", "brsf", "frsf")
CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "configs",
                      "vit_mnist.py")
UNCONVERTED = "flax ViT, unconverted"


def mnist_shaped(n: int = NUM_EXAMPLES, seed: int = 0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, IMAGE, IMAGE, 1), dtype=np.float32),
            rng.integers(0, NUM_CLASSES, n).astype(np.int32))


def vit_config(rule: str, alignment: bool):
    """``configs/vit_mnist.py``'s config for ``rule``, the alignment metric on or off."""
    spec = importlib.util.spec_from_file_location("vit_mnist_config", CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(rule)
    config.alignment.enabled = alignment
    return config


def schedule_steps(config) -> int:
    """The run length the config's schedule decays over (its epochs of this data)."""
    return config.training.epochs * (NUM_EXAMPLES // config.data.batch_size)


# ----------------------------------------------------------------------------- Flax side


class SilentWriter:
    """Takes the trainer's metrics and writes nothing."""

    def write_scalars(self, step, scalars):
        del step, scalars

    def flush(self):
        pass


def flax_timers(rules: list[str], steps: int, alignment: bool):
    """``(timers, flax parameter count, spec for the peer)``: one warmed-up timer per
    variant, each called once per round to time ``steps`` more steps of ``Trainer.fit``."""
    import jax  # pylint: disable=import-outside-toplevel

    import bioflax  # pylint: disable=import-outside-toplevel
    from bioflax import converter, losses  # pylint: disable=import-outside-toplevel
    from bioflax.experiment import (  # pylint: disable=import-outside-toplevel
        datasets, initializers, optimizers, run)
    from bioflax.trainer import (  # pylint: disable=import-outside-toplevel
        ArrayData, InMemory, OptimizerFactory, Task, Trainer)
    from bioflax.trainer.metrics import (  # pylint: disable=import-outside-toplevel
        COLLECTIONS)
    from bioflax.zoo import VisionTransformer  # pylint: disable=import-outside-toplevel

    assert bioflax.convert is converter.convert  # what run.build_task converts with
    inputs, targets = mnist_shaped()
    source = InMemory(ArrayData(inputs=inputs, targets=targets))
    info = datasets.DatasetInfo("classification", (IMAGE, IMAGE, 1), NUM_CLASSES)

    class RoundTimer:
        """A task through its own trainer, compiled and warmed up by one round; each call
        trains ``steps`` more steps and returns their examples/s."""

        def __init__(self, task: Task, config):
            self.trainer = Trainer(
                max_epochs=1, limit_train_batches=steps,
                log_every_steps=min(steps, config.training.log_every_steps),
                console=False, report_progress=False, writer=SilentWriter(),
                compiler_options=config.compiler_options.to_dict())
            self.task = task
            self.state = self.trainer.init_state(task, source.sample_input(),
                                                 schedule_steps(config))
            self.state = self._fit()

        def _fit(self):
            return self.trainer.fit(self.task, source, batch_size=BATCH,
                                    state=self.state).state

        def __call__(self) -> float:
            self.trainer.max_epochs += 1  # one "epoch" is `steps` steps (limit_train_batches)
            start = time.perf_counter()
            self.state = jax.block_until_ready(self._fit())
            return steps * BATCH / (time.perf_counter() - start)

    timers, parameters = {}, None
    configs = {f"bioflax {rule}": vit_config(rule, alignment) for rule in rules}
    bp_config = vit_config("bp", alignment)
    plain = VisionTransformer(num_classes=NUM_CLASSES, kernel_init=initializers.get(
        bp_config.model.kernel_init, bp_config.model.kernel_init_scale))
    tasks = {UNCONVERTED: (Task(
        module=plain, loss=losses.loss_for("classification", bp_config.model.loss),
        optimizer=OptimizerFactory(lambda total: optimizers.build(bp_config.optimizer, total)),
        metrics=COLLECTIONS["classification"]), bp_config)}
    for name, config in configs.items():
        every = config.alignment.every_steps if alignment else 0
        tasks[name] = (run.build_task(config, info, every, source.sample_input()), config)
    for name, (task, config) in tasks.items():
        start = time.perf_counter()
        timers[name] = RoundTimer(task, config)
        if name == UNCONVERTED:  # KP's feedback matrices are trained 'params' too
            parameters = sum(p.size for p in jax.tree.leaves(timers[name].state.params))
        print(f"  {name}: compiled and warmed up in {time.perf_counter() - start:.0f} s",
              flush=True)
    spec = {"steps": steps, "patch_size": plain.patch_size, "width": plain.width,
            "depth": plain.depth, "num_heads": plain.num_heads, "mlp_ratio": plain.mlp_ratio,
            "dropout_rate": plain.dropout_rate, "learning_rate": bp_config.optimizer.learning_rate,
            "warmup_steps": bp_config.optimizer.warmup_steps,
            "total_steps": schedule_steps(bp_config)}
    if (bp_config.optimizer.name, bp_config.optimizer.schedule,
            bp_config.optimizer.weight_decay) != ("adam", "cosine", 0.0):
        raise RuntimeError("configs/vit_mnist.py's optimizer changed: update the PyTorch peer")
    return timers, parameters, spec


# ----------------------------------------------------------------------------- peer


def torch_vit(spec: dict):
    """The ViT of the module docstring in PyTorch, NCHW inputs."""
    import torch  # pylint: disable=import-outside-toplevel
    from torch import nn  # pylint: disable=import-outside-toplevel

    width, rate = spec["width"], spec["dropout_rate"]

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1 = nn.LayerNorm(width, eps=1e-6)
            self.attention = nn.MultiheadAttention(width, spec["num_heads"], batch_first=True)
            self.drop1 = nn.Dropout(rate)
            self.ln2 = nn.LayerNorm(width, eps=1e-6)
            self.mlp1 = nn.Linear(width, spec["mlp_ratio"] * width)
            self.gelu = nn.GELU(approximate="tanh")
            self.mlp2 = nn.Linear(spec["mlp_ratio"] * width, width)
            self.drop2 = nn.Dropout(rate)

        def forward(self, x):
            y = self.ln1(x)
            x = x + self.drop1(self.attention(y, y, y, need_weights=False)[0])
            return x + self.drop2(self.mlp2(self.gelu(self.mlp1(self.ln2(x)))))

    class ViT(nn.Module):
        def __init__(self):
            super().__init__()
            p = spec["patch_size"]
            tokens = (IMAGE // p) ** 2 + 1
            self.patch_embed = nn.Conv2d(1, width, p, stride=p)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
            self.position_embedding = nn.Parameter(torch.randn(1, tokens, width) * 0.02)
            self.dropout = nn.Dropout(rate)
            self.blocks = nn.Sequential(*[Block() for _ in range(spec["depth"])])
            self.ln = nn.LayerNorm(width, eps=1e-6)
            self.head = nn.Linear(width, NUM_CLASSES)
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Conv2d)):
                    nn.init.xavier_uniform_(module.weight)
                    nn.init.zeros_(module.bias)

        def forward(self, x):
            x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (N, patches, width)
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
            x = self.blocks(self.dropout(x + self.position_embedding))
            return self.head(self.ln(x[:, 0]))

    return ViT()


def warmup_cosine(spec: dict):
    """optax's ``join_schedules([linear 0 → 1 over warm-up, cosine_decay])`` as a factor
    of the learning rate, for ``LambdaLR``."""
    import math  # pylint: disable=import-outside-toplevel
    warmup, decay = spec["warmup_steps"], max(spec["total_steps"] - spec["warmup_steps"], 1)

    def factor(step: int) -> float:
        if step < warmup:
            return step / warmup
        return 0.5 * (1 + math.cos(math.pi * min(step - warmup, decay) / decay))
    return factor


def peer_main(spec: dict) -> None:
    """Runs in the peer interpreter: builds the PyTorch ViT, then on each line read from
    stdin times one round (``steps`` steps) and prints its rate as one JSON line."""
    import torch  # pylint: disable=import-outside-toplevel

    steps = spec["steps"]
    inputs, targets = mnist_shaped()
    x_all = torch.from_numpy(np.ascontiguousarray(inputs.transpose(0, 3, 1, 2)))
    y_all = torch.from_numpy(targets.astype(np.int64))
    torch.manual_seed(0)
    model = torch_vit(spec).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=spec["learning_rate"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(spec))
    loss_fn = torch.nn.CrossEntropyLoss()

    def run(round_: int) -> float:
        order = np.random.default_rng(round_).permutation(NUM_EXAMPLES)
        indices = torch.from_numpy(order[:steps * BATCH].reshape(steps, BATCH))
        start = time.perf_counter()
        for idx in indices:
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(x_all[idx]), y_all[idx]).backward()
            optimizer.step()
            scheduler.step()
        return steps * BATCH / (time.perf_counter() - start)

    run(0)
    print(json.dumps({"version": f"torch {torch.__version__}, "
                                 f"{torch.get_num_threads()} threads",
                      "parameters": sum(p.numel() for p in model.parameters())}), flush=True)
    for line in sys.stdin:
        print(json.dumps({"plain PyTorch": run(int(line))}), flush=True)


# ----------------------------------------------------------------------------- main


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer-python", default="",
                        help="an interpreter with torch, for the plain PyTorch loop")
    parser.add_argument("--steps", type=int, default=100, help="steps per timed figure")
    parser.add_argument("--repeats", type=int, default=3, help="rounds (figures per variant)")
    parser.add_argument("--rules", default=",".join(RULE_NAMES),
                        help="the bioflax rules to time, comma-separated")
    parser.add_argument("--alignment", action="store_true",
                        help="measure the alignment metric every 100 steps, as the config does")
    parser.add_argument("--peer_only", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer_only:
        peer_main(json.loads(args.peer_only))
        return
    rules = args.rules.split(",")
    if "bp" not in rules:
        parser.error("--rules must include bp (the ratios are to it)")

    import jax  # pylint: disable=import-outside-toplevel
    device = jax.devices()[0]
    print(f"device: {device.platform} {device.device_kind}; jax {jax.__version__}; "
          f"zoo VisionTransformer (vit_mnist), batch {BATCH}, Adam (configs/vit_mnist.py), "
          f"float32; alignment metric {'every 100 steps' if args.alignment else 'off'}; "
          f"{args.steps} steps per figure, median of {args.repeats} interleaved rounds")
    timers, parameters, spec = flax_timers(rules, args.steps, args.alignment)
    why_not = peer_python_ok(args.peer_python, "torch")
    peer = Peers(args.peer_python, __file__, json.dumps(spec)) if not why_not else None
    print(f"parameters: flax {parameters:,}"
          + (f"; PyTorch {peer.info['parameters']:,}" if peer else ""))
    if peer and peer.info['parameters'] != parameters:
        print("error: the PyTorch ViT's parameter count differs from the Flax one's")
    print(f"peer: {peer.version}" if peer else f"peer skipped: {why_not}")

    rates, loads, before = {name: [] for name in timers}, [], cpu_times()
    for round_ in range(1, args.repeats + 1):
        for name, timer in timers.items():
            rates[name].append(timer())
        if peer:
            for name, rate in peer.round(round_).items():
                rates.setdefault(name, []).append(rate)
        loads.append(os.getloadavg()[0])
    if peer:
        peer.close()

    median = {name: statistics.median(values) for name, values in rates.items()}
    print(f"\nload average (1 min) after each round: {', '.join(f'{l:.1f}' for l in loads)}; "
          f"{os.cpu_count()} CPUs")
    print(noise_report(rates, before, cpu_times()))
    print(f"{'implementation':<24} {'median ex/s':>12}   rounds")
    for name, values in rates.items():
        print(f"{name:<24} {median[name]:>12,.0f}   {', '.join(f'{v:,.0f}' for v in values)}")
    bp = median["bioflax bp"]
    print("\nratios (targets: each rule >= 0.9x bioflax bp; bioflax bp / plain PyTorch >= 1.0)")
    print(f"  bioflax bp / {UNCONVERTED}: {bp / median[UNCONVERTED]:.2f}")
    if "plain PyTorch" in median:
        print(f"  bioflax bp / plain PyTorch: {bp / median['plain PyTorch']:.2f}")
    for rule in rules:
        print(f"  {rule:<5} bioflax / bioflax bp {median[f'bioflax {rule}'] / bp:.2f}")


if __name__ == "__main__":
    main()
