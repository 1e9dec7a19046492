"""Akrout et al. 2019, "Deep learning without weight transport", MNIST experiment of the
reference code (github.com/makrout/Deep-Learning-without-Weight-Transport, experiments/mnist):
784-500-10 sigmoid, plain SGD, batch 128, 400 epochs, learning rate 0.2 (BP, FA) / 0.3 (KP),
no weight decay, pixels in [0, 1], all 60k training images, tested on the 10k test images.

Run one rule with ``--config=configs/paper/akrout2019.py:fa`` (bp, fa, kp or wm).

``wm`` is the weight-mirror run of the reference code (``fcnn/FCNN_WM.py``, learning rate
0.05): FA whose ``B`` learns by the mirror update (``bioflax.procedures.WeightMirror``),
uniform noise of amplitude 0.1 (±0.05), rate 0.01, a mirror batch of 128 through the
layer's sigmoid (the reference's ``sigmoid(W x̃ + b)``), 468 mirror steps before training
and one after each step, no decay of ``B`` (the reference's normalisation has no effect).

The output layer is one sigmoid per class with summed binary cross-entropies, as in the
reference code. Where bioflax differs from it (written down in docs/results.md):
LeCun-normal initialisation instead of N(0, 1/(fan_in + fan_out)); a reshuffled order each
epoch instead of the file order; biases trained at the learning rate (the reference code
divides their update by the batch size twice).
"""

from bioflax.experiment.configs.paper import mnist_protocol

LEARNING_RATES = {"bp": 0.2, "fa": 0.2, "kp": 0.3, "wm": 0.05}
RULES = tuple(LEARNING_RATES)
# settings trained by a procedure of bioflax.procedures: (rule, procedure, its options).
PROCEDURES = {"wm": ("fa", "weight_mirror", {"response": "sigmoid"})}


def get_config(rule: str = "bp"):
    if rule not in LEARNING_RATES:
        raise ValueError(f"akrout2019 has no {rule!r} setting; choose one of {list(LEARNING_RATES)}")
    config = mnist_protocol(batch_size=128)
    config.model.rule = rule
    if rule in PROCEDURES:
        config.model.rule, config.procedure.name, options = PROCEDURES[rule]
        config.procedure[config.procedure.name].update(options)
    config.model.hidden_layers = (500,)
    config.model.activations = ("sigmoid",)
    config.optimizer.learning_rate = LEARNING_RATES[rule]
    config.optimizer.momentum = 0.0
    config.training.epochs = 400
    config.training.checkpoint_every_epochs = 100.0
    return config
