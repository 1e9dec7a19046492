"""Dellaferrera & Kreiman 2022, "Error-driven input modulation: solving the credit
assignment problem without a backward pass" (PEPITA), the reference code's MNIST command
(GiorgiaD/PEPITA at 3fe03d8, README): 784-1024-10 ReLU without biases (the zoo's
``pepita_mlp``), dropout 0.1 shared by the two passes, softmax cross-entropy, He-uniform W
(U(±√(6/fan_in))), ``F`` = 0.05·U(±√(6/784)), SGD with momentum 0.9, learning rate 0.1
×0.1 at epochs 60 and 90, batch 64, 100 epochs, pixels in [0, 1], all 60k training images
(the reference validates on the test set; nothing is chosen on it here).

``--config=configs/paper/dellaferrera2022.py`` (PEPITA) or ``:bp`` (backprop, same protocol).
"""

import math

from bioflax.experiment.configs.paper import mnist_protocol

SETTINGS = ("pepita", "bp")


def get_config(setting: str = "pepita"):
    if setting not in SETTINGS:
        raise ValueError(f"dellaferrera2022 has no {setting!r} setting; choose one of "
                         f"{list(SETTINGS)}")
    config = mnist_protocol(batch_size=64)
    config.data.flatten = False  # the model flattens
    config.model.name = "pepita_mlp"
    config.model.rule = "bp"
    config.model.loss = "softmax_cross_entropy"
    config.model.kernel_init = "fan_in_uniform"
    config.model.kernel_init_scale = math.sqrt(6.0)
    config.procedure.name = "pepita" if setting == "pepita" else "gradient"
    config.optimizer.learning_rate = 0.1
    config.optimizer.momentum = 0.9
    config.optimizer.schedule = "multistep"
    config.optimizer.decay_at = (0.6, 0.9)
    config.optimizer.decay_factor = 0.1
    config.training.epochs = 100
    config.training.checkpoint_every_epochs = 10.0
    return config
