"""Frenkel, Lefebvre & Bol 2021, "Learning without feedback: fixed random learning signals
allow for feedforward training of deep neural networks" (DRTP), MNIST protocol of the
reference code's defaults (ChFrenkel/DirectRandomTargetProjection at b84e3fe, main.py):
``CONV_32_5_1_2_FC_1000_FC_10`` (the zoo's ``drtp_conv``), tanh hidden layers, a sigmoid
per class with binary cross-entropy averaged over the classes, SGD with Nesterov momentum
0.9, learning rate 1e-4, batch 100, 100 epochs, no dropout, PyTorch's default
initialisation (U(±1/√fan_in)), pixels in [0, 1], all 60k training images.

``--config=configs/paper/frenkel2021.py:RULE`` with RULE one of drtp, dfa, sdfa, fa, bp
(the same protocol for each). DRTP's and DFA's ``B`` at a layer's output: U(±√(6/n)), ``n``
that output's size (the conv layer's 32×28×28 before pooling in the reference; here the
conv's pooled 6272 features, where the next layer reads them).
"""

import math

from bioflax.experiment.configs.paper import mnist_protocol

# setting → (rule, DFA's signal)
RULES = {"drtp": ("drtp", "error"), "dfa": ("dfa", "error"), "sdfa": ("dfa", "sign"),
         "fa": ("fa", "error"), "bp": ("bp", "error")}


def get_config(setting: str = "drtp"):
    if setting not in RULES:
        raise ValueError(f"frenkel2021 has no {setting!r} setting; choose one of {list(RULES)}")
    config = mnist_protocol(batch_size=100)
    config.data.flatten = False
    config.model.name = "drtp_conv"
    config.model.rule, config.model.dfa_signal = RULES[setting]
    config.model.loss = "sigmoid_mean_cross_entropy"
    config.model.kernel_init = "fan_in_uniform"
    config.model.feedback_init = "fan_in_uniform"
    config.model.feedback_init_scale = math.sqrt(6.0)
    config.optimizer.learning_rate = 1e-4
    config.optimizer.momentum = 0.9
    config.optimizer.nesterov = True
    config.training.epochs = 100
    config.training.checkpoint_every_epochs = 10.0
    return config
