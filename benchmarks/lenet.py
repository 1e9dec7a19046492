"""Training examples/s of LeNet-5 on MNIST-shaped data: bioflax against biotorch, side by side.

The network is biotorch 0.0.16's ``LeNetMNIST`` (``biotorch/models/le_net.py``), on 32×32×1
inputs (biotorch resizes MNIST bilinearly to 32×32), written in Flax with the input
channels last:

    conv1  5×5, 1 → 6, stride 1, VALID (32×32 → 28×28), ReLU, max-pool 2×2 stride 2 (→ 14×14)
    conv2  5×5, 6 → 16, VALID (→ 10×10), ReLU, max-pool 2×2 stride 2 (→ 5×5)
    conv3  5×5, 16 → 120, VALID (→ 1×1), ReLU, flatten (120)
    fc1    120 → 84, ReLU
    fc2    84 → 10 (logits)

Every conv and dense layer has a bias. Weights and feedback matrices are Xavier-uniform, as
biotorch's benchmark initialises them (``init: "xavier"``) and as ``bioflax.zoo.LeNet5`` and
``configs/paper/sanfiz2021.py`` do; it matters for speed only to brSF, which draws a new
feedback matrix from that initialiser at every step. Max-pooling is
:func:`bioflax.zoo.max_pool` (the values and gradient of ``nn.max_pool`` with window and
stride 2, computed as maxima of rows and columns and a select against each window's first
maximum), for every Flax variant alike, as in the zoo's ``LeNet5``.

Training: softmax cross-entropy, plain SGD (learning rate 0.01), batch 128, float32. The
Flax side runs the trainer's pattern: the data set (60,000 random examples: speed does not
depend on the values) sits on the device, and one compiled program runs ``--steps`` (100)
steps in a ``lax.scan``, gathering each batch on the device from an index array. One
figure is one such program's examples/s after compilation; the variants take turns
(interleaved) for ``--repeats`` rounds and each is reported by its median; the report ends
with how far one variant's rounds lie apart and the share of CPU time the hypervisor took,
and warns when the rounds differ by more than 1.25×.

Flax variants (``make_model(rule, impl)``):

- ``flax nn.Conv bp``: ``bioflax.zoo.LeNet5``, plain ``flax.linen.Conv`` and ``nn.Dense``
  layers, backprop (XLA's convolutions);
- ``bioflax RULE``: the same network converted by ``bioflax.convert(lenet, RULE,
  conv_impl='auto')`` for every rule, as the LeNet configs convert it (on CPU its
  convolutions run as :mod:`bioflax.conv`'s banded matmuls), compiled with
  ``bioflax.conv.CPU_COMPILER_OPTIONS`` as the LeNet configs train it;
- ``bioflax bp, XLA defaults``: the same BP without those options;
- ``hand-built bp`` and ``hand-built fa``: the network written by hand from
  :func:`bioflax.conv.conv` (FA: a ``custom_vjp`` sending down ``conv(·, B)``'s
  input-gradient, and ``RandomDenseLinearFA``), to show what the converter costs.

Peers, when ``--peer-python`` names an interpreter with torch (and biotorch 0.0.16,
installed with ``--no-deps``): a plain PyTorch loop of the same LeNet (biotorch's
``LeNetMNIST`` module unconverted) and biotorch's ``BioModule`` in each of its modes
``backpropagation``, ``fa``, ``dfa``, ``usf``, ``brsf``, ``frsf``, on NCHW inputs, with
``torch.optim.SGD`` and ``CrossEntropyLoss``, each figure ``--steps`` steps on batches
indexed from a tensor in memory. They run in a process of their own, driven round by
round so that their rounds interleave with the Flax ones in time.

    python benchmarks/lenet.py [--peer-python /path/to/python] [--steps 100] [--repeats 3]
"""

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

BATCH, NUM_EXAMPLES, NUM_CLASSES, LEARNING_RATE = 128, 60_000, 10, 0.01
PEERS = ("torch", "backpropagation", "fa", "dfa", "usf", "brsf", "frsf")
PEER_NAMES = {"torch": "plain PyTorch", "backpropagation": "biotorch bp"}


def mnist_shaped(n: int = NUM_EXAMPLES, seed: int = 0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, 32, 32, 1), dtype=np.float32),
            rng.integers(0, NUM_CLASSES, n).astype(np.int32))


def chunk_indices(steps: int, round_: int) -> np.ndarray:
    order = np.random.default_rng(round_).permutation(NUM_EXAMPLES)
    return order[:steps * BATCH].reshape(steps, BATCH)


# ----------------------------------------------------------------------------- Flax side


def flax_side():
    """The Flax models and their timers; imported only where JAX runs."""
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    from flax import linen as nn  # pylint: disable=import-outside-toplevel

    import bioflax  # pylint: disable=import-outside-toplevel
    from bioflax.conv import conv  # pylint: disable=import-outside-toplevel
    from bioflax.rules import get_rule  # pylint: disable=import-outside-toplevel
    from bioflax.zoo import (  # pylint: disable=import-outside-toplevel
        LeNet5, max_pool, xavier_uniform)

    @jax.custom_vjp
    def fa_conv(x, kernel, bias, feedback):
        return conv(x, kernel, padding="VALID") + bias

    def fa_conv_fwd(x, kernel, bias, feedback):
        return fa_conv(x, kernel, bias, feedback), (x, kernel, feedback)

    def fa_conv_bwd(residuals, dy):
        x, kernel, feedback = residuals
        dx, = jax.vjp(lambda h: conv(h, feedback, padding="VALID"), x)[1](dy)
        dkernel, = jax.vjp(lambda w: conv(x, w, padding="VALID"), kernel)[1](dy)
        return dx, dkernel, dy.sum(axis=(0, 1, 2)), jnp.zeros_like(feedback)

    fa_conv.defvjp(fa_conv_fwd, fa_conv_bwd)

    class Conv(nn.Module):
        """A 5×5 VALID conv layer with bias, as ``nn.Conv``, computed by ``bioflax.conv``;
        with ``fa``, trained by feedback alignment with a fixed ``B`` in ``'feedback'``."""
        features: int
        fa: bool = False

        @nn.compact
        def __call__(self, x):
            shape = (5, 5, x.shape[-1], self.features)
            kernel = self.param("kernel", xavier_uniform, shape)
            bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
            if not self.fa:
                return conv(x, kernel, padding="VALID") + bias
            feedback = self.variable(
                "feedback", "kernel",
                lambda: xavier_uniform(self.make_rng("params"), shape)).value
            return fa_conv(x, kernel, bias, feedback)

    class LeNet(nn.Module):
        """``LeNet5`` (biotorch's LeNetMNIST, module docstring) from the given layer
        constructors."""
        conv_layer: object
        dense_layer: object

        @nn.compact
        def __call__(self, x):
            x = max_pool(nn.relu(self.conv_layer(6)(x)))
            x = max_pool(nn.relu(self.conv_layer(16)(x)))
            x = nn.relu(self.conv_layer(120)(x)).reshape(x.shape[0], -1)
            x = nn.relu(self.dense_layer(84)(x))
            return self.dense_layer(NUM_CLASSES)(x)

    plain = LeNet5()
    dense = functools.partial(nn.Dense, kernel_init=xavier_uniform)
    hand_built = {"bp": LeNet(Conv, dense),
                  "fa": LeNet(functools.partial(Conv, fa=True), functools.partial(
                      bioflax.RandomDenseLinearFA, kernel_init=xavier_uniform,
                      feedback_init=xavier_uniform))}

    def make_model(rule: str, impl: str) -> nn.Module:
        """LeNet trained by ``rule``: ``impl`` ``'nn.Conv'`` (plain, bp), ``'convert'``
        (``bioflax.convert``, any rule) or ``'hand-built'`` (bp, fa)."""
        return {"nn.Conv": lambda: plain,
                "convert": lambda: bioflax.convert(
                    plain, get_rule(rule, **({} if rule == "bp" else {"feedback_init": xavier_uniform})),
                    conv_impl="auto"),
                "hand-built": lambda: hand_built[rule]}[impl]()

    class ChunkTimer:
        """One model's compiled chunk of ``steps`` SGD steps, warmed up; each call times
        one more chunk and returns its examples/s."""

        def __init__(self, model: nn.Module, inputs, targets, steps: int,
                     compiler_options=None):
            self.inputs, self.targets = jnp.asarray(inputs), jnp.asarray(targets)
            variables = model.init(jax.random.key(0), self.inputs[:1])
            self.params = variables["params"]
            self.fixed = {k: v for k, v in variables.items() if k != "params"}
            self.steps = steps

            def loss(params, fixed, x, y, key):
                logits = model.apply({"params": params, **fixed}, x,
                                     rngs={"feedback": key})  # brSF redraws B per step
                return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits),
                                                     y[:, None], axis=1))

            def chunk(params, fixed, data, targets, indices):
                def step(params, idx):
                    key = jax.random.fold_in(jax.random.key(0), idx[0])
                    value, grads = jax.value_and_grad(loss)(params, fixed, data[idx],
                                                            targets[idx], key)
                    params = jax.tree.map(lambda p, g: p - LEARNING_RATE * g, params, grads)
                    return params, value
                return jax.lax.scan(step, params, indices)

            self.chunk = jax.jit(chunk, donate_argnums=0, compiler_options=compiler_options)
            self(0)  # round 0 warms up; timed rounds count from 1

        def __call__(self, round_: int) -> float:
            indices = jnp.asarray(chunk_indices(self.steps, round_))
            start = time.perf_counter()
            self.params, losses = self.chunk(self.params, self.fixed, self.inputs,
                                             self.targets, indices)
            jax.block_until_ready(losses)
            return self.steps * BATCH / (time.perf_counter() - start)

    return make_model, ChunkTimer


# ----------------------------------------------------------------------------- peers


def peer_main(steps: int) -> None:
    """Runs in the peer interpreter: builds every peer, then on each line read from stdin
    times one round (``steps`` steps of each peer) and prints the rates as one JSON line."""
    import importlib.util  # pylint: disable=import-outside-toplevel

    import torch  # pylint: disable=import-outside-toplevel
    from biotorch.module.biomodule import BioModule  # pylint: disable=import-outside-toplevel

    # biotorch.models imports torchvision; its LeNet file needs only torch.
    spec = importlib.util.find_spec("biotorch")
    path = os.path.join(os.path.dirname(spec.origin), "models", "le_net.py")
    module_spec = importlib.util.spec_from_file_location("biotorch_le_net", path)
    le_net = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(le_net)

    inputs, targets = mnist_shaped()
    x_all = torch.from_numpy(np.ascontiguousarray(inputs.transpose(0, 3, 1, 2)))
    y_all = torch.from_numpy(targets.astype(np.int64))
    loss_fn = torch.nn.CrossEntropyLoss()
    torch.manual_seed(0)
    models = {}
    for name in PEERS:
        stdout = sys.stdout
        sys.stdout = sys.stderr  # BioModule prints its conversion summary
        try:
            model = le_net.LeNetMNIST() if name == "torch" else BioModule(
                le_net.LeNetMNIST(), mode=name, output_dim=NUM_CLASSES)
        finally:
            sys.stdout = stdout
        models[name] = (model.train(), torch.optim.SGD(model.parameters(), lr=LEARNING_RATE))

    def run(name: str, round_: int) -> float:
        model, optimizer = models[name]
        indices = torch.from_numpy(chunk_indices(steps, round_))
        start = time.perf_counter()
        for idx in indices:
            x, y = x_all[idx], y_all[idx]
            optimizer.zero_grad(set_to_none=True)
            out = model(x, y, loss_fn) if name == "dfa" else model(x)
            loss_fn(out, y).backward()
            optimizer.step()
        return steps * BATCH / (time.perf_counter() - start)

    for name in PEERS:
        run(name, 0)
    print(json.dumps({"version": f"torch {torch.__version__}, biotorch 0.0.16"}), flush=True)
    for line in sys.stdin:
        round_ = int(line)
        print(json.dumps({name: run(name, round_) for name in PEERS}), flush=True)


class Peers:
    """A peer process, ``python script --peer_only *args``, driven round by round:
    ``round(r)`` returns its rates for round ``r``; ``info`` is its first line (JSON, with
    at least ``version``)."""

    def __init__(self, python: str, script: str, *args: str):
        self.process = subprocess.Popen(
            [python, os.path.abspath(script), "--peer_only", *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = json.loads(self._line())
        self.version = self.info["version"]

    def _line(self) -> str:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the peer process ended (exit code {self.process.wait()})")
        return line

    def round(self, round_: int) -> dict:
        self.process.stdin.write(f"{round_}\n")
        self.process.stdin.flush()
        return json.loads(self._line())

    def close(self):
        self.process.stdin.close()
        self.process.wait()


def peer_python_ok(python: str, imports: str = "torch, biotorch.module.biomodule") -> str:
    """'' when ``python`` can import ``imports``, else why not."""
    if not python:
        return "no --peer-python given"
    check = subprocess.run([python, "-c", f"import {imports}"],
                           capture_output=True, text=True, check=False)
    return "" if check.returncode == 0 else check.stderr.strip().splitlines()[-1]


def cpu_times() -> list[int] | None:
    """The machine's CPU time counters (``/proc/stat``'s ``cpu`` line: user, nice, system,
    idle, iowait, irq, softirq, steal), or None where there is no ``/proc/stat``."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            return [int(field) for field in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return None


def noise_report(rates: dict[str, list[float]], before, after) -> str:
    """How far one variant's rounds lie apart (largest max/min), and which share of CPU time
    the hypervisor took (steal) while they ran: the two signs that a machine is too noisy
    for one run's figures."""
    spread, name = max((max(v) / min(v), n) for n, v in rates.items())
    line = f"rounds of one variant lie up to {spread:.2f}x apart ({name})"
    if before and after:
        delta = [b - a for a, b in zip(before, after)]
        line += f"; CPU time stolen by the hypervisor: {delta[7] / max(sum(delta), 1):.0%}"
    if spread > 1.25:
        line += ("\nwarning: this machine was noisy during the run; take medians over several "
                 "runs, or rerun when it is quiet")
    return line


# ----------------------------------------------------------------------------- main


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer-python", default="",
                        help="an interpreter with torch and biotorch 0.0.16 for the peers")
    parser.add_argument("--steps", type=int, default=100, help="steps per timed figure")
    parser.add_argument("--repeats", type=int, default=3, help="rounds (figures per variant)")
    parser.add_argument("--rules", default="bp,fa,kp,dfa,usf,brsf,frsf",
                        help="the bioflax rules to time, comma-separated")
    parser.add_argument("--peer_only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer_only:
        peer_main(args.steps)
        return

    import jax  # pylint: disable=import-outside-toplevel
    from bioflax.conv import (  # pylint: disable=import-outside-toplevel
        CPU_COMPILER_OPTIONS as options)
    make_model, ChunkTimer = flax_side()
    inputs, targets = mnist_shaped()
    device = jax.devices()[0]
    print(f"device: {device.platform} {device.device_kind}; jax {jax.__version__}; "
          f"LeNet-5 (biotorch LeNetMNIST), batch {BATCH}, SGD, float32; {args.steps} steps "
          f"per figure, median of {args.repeats} interleaved rounds")
    variants = {"flax nn.Conv bp": ("bp", "nn.Conv", None),
                "hand-built bp": ("bp", "hand-built", options),
                "hand-built fa": ("fa", "hand-built", options),
                "bioflax bp, XLA defaults": ("bp", "convert", None),
                **{f"bioflax {rule}": (rule, "convert", options)
                   for rule in args.rules.split(",")}}
    timers = {}
    for name, (rule, impl, compiler_options) in variants.items():
        start = time.perf_counter()
        timers[name] = ChunkTimer(make_model(rule, impl), inputs, targets, args.steps,
                                  compiler_options)
        print(f"  {name}: compiled and warmed up in {time.perf_counter() - start:.0f} s",
              flush=True)
    why_not = peer_python_ok(args.peer_python)
    peers = Peers(args.peer_python, __file__, "--steps", str(args.steps)) if not why_not else None
    print(f"peers: {peers.version}" if peers else f"peers skipped: {why_not}")

    rates, loads, before = {name: [] for name in timers}, [], cpu_times()
    for round_ in range(1, args.repeats + 1):
        for name, timer in timers.items():
            rates[name].append(timer(round_))
        if peers:
            for name, rate in peers.round(round_).items():
                rates.setdefault(PEER_NAMES.get(name, f"biotorch {name}"), []).append(rate)
        loads.append(os.getloadavg()[0])
    if peers:
        peers.close()

    median = {name: statistics.median(values) for name, values in rates.items()}
    print(f"\nload average (1 min) after each round: {', '.join(f'{l:.1f}' for l in loads)}; "
          f"{os.cpu_count()} CPUs")
    print(noise_report(rates, before, cpu_times()))
    print(f"{'implementation':<26} {'median ex/s':>12}   rounds")
    for name, values in rates.items():
        print(f"{name:<26} {median[name]:>12,.0f}   {', '.join(f'{v:,.0f}' for v in values)}")
    bp = median["bioflax bp"]
    print("\nratios (targets: bioflax bp / plain PyTorch >= 1.2; each rule >= 1.5x biotorch's "
          "same rule and >= 0.9x bioflax bp)")
    print(f"  bioflax bp / flax nn.Conv bp: {bp / median['flax nn.Conv bp']:.2f}")
    print(f"  bioflax bp / XLA defaults:    {bp / median['bioflax bp, XLA defaults']:.2f}")
    for rule in ("bp", "fa"):
        if f"bioflax {rule}" in median:
            print(f"  converter / hand-built, {rule}: "
                  f"{median[f'bioflax {rule}'] / median[f'hand-built {rule}']:.2f}")
    if "plain PyTorch" in median:
        print(f"  bioflax bp / plain PyTorch:   {bp / median['plain PyTorch']:.2f}")
    for rule in ("bp", "fa", "kp", "dfa", "usf", "brsf", "frsf"):
        ours, theirs = median.get(f"bioflax {rule}"), median.get(f"biotorch {rule}")
        if not ours:
            continue
        parts = [f"{rule:<5}", f"bioflax / bioflax bp {ours / bp:.2f}"]
        if theirs:
            parts.append(f"bioflax / biotorch {ours / theirs:.2f}")
        print("  " + "   ".join(parts))


if __name__ == "__main__":
    main()
