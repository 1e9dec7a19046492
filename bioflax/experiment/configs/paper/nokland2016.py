"""Nøkland 2016, "Direct feedback alignment provides learning in deep neural networks",
MNIST fully connected tanh networks, with the set-up of his reference code
(github.com/anokland/dfa-torch, Main.lua and Models/): RMSprop with learning rate 1e-4,
batch 64, pixels in [0, 1], all 60k training images, at most 300 epochs, stopping once the
running average of the epochs' training error, m ← 0.75·m + 0.25·error, reaches 0.01 %.

Run one network and rule with ``--config=configs/paper/nokland2016.py:7x240_dfa``
(architectures 7x240, 2x800, 1x800; rules bp, fa, dfa).

Initialisation as in the reference code: BP uses PyTorch/Torch7's nn.Linear default,
W ~ U[−1/√fan_in, 1/√fan_in]; DFA starts every layer from W = 0, FA every layer but the
input layer (its Models/mlp.lua builds that one as a plain nn.Linear, which keeps the
default init); FA's B follows that same uniform law and DFA's B ~ U[−1/√width, 1/√width]
for a hidden layer of that width; sigmoid outputs with binary cross-entropy. Where bioflax
differs (written down in docs/results.md): biases start at 0 (Torch7 draws them like the
weights); the running average starts at the first epoch's error (the reference code's at 1).
"""

from bioflax.experiment.configs.paper import mnist_protocol

ARCHITECTURES = {"7x240": (240,) * 7, "2x800": (800, 800), "1x800": (800,)}
RULES = ("bp", "fa", "dfa")
BATCH_SIZE = 64


def get_config(setting: str = "7x240_dfa"):
    architecture, _, rule = setting.partition("_")
    if architecture not in ARCHITECTURES or rule not in RULES:
        raise ValueError(f"nokland2016 has no {setting!r} setting; use ARCH_RULE with ARCH in "
                         f"{list(ARCHITECTURES)} and RULE in {list(RULES)}, e.g. 7x240_dfa")
    # Logs once per epoch: the stopping rule reads that epoch's training accuracy.
    config = mnist_protocol(BATCH_SIZE)
    config.model.rule = rule
    config.model.hidden_layers = ARCHITECTURES[architecture]
    config.model.activations = ("tanh",) * len(ARCHITECTURES[architecture])
    config.model.kernel_init = "fan_in_uniform" if rule == "bp" else "zeros"
    if rule == "fa":
        config.model.input_layer_kernel_init = "fan_in_uniform"
    config.model.feedback_init = "fan_in_uniform"
    config.optimizer.name = "rmsprop"
    config.optimizer.learning_rate = 1e-4
    config.training.epochs = 300
    config.training.checkpoint_every_epochs = 10.0
    # Main.lua: train_err_mean = 0.75 * train_err_mean + 0.25 * ErrTrain, stop at ≤ 1e-4.
    config.training.early_stopping_monitor = "train/accuracy"
    config.training.early_stopping_mode = "max"
    config.training.stopping_threshold = 0.9999
    config.training.stopping_smoothing = 0.75
    return config
