"""Hinton 2022, "The Forward-Forward algorithm", MNIST protocol of loeweX/Forward-Forward
(at da516f0, ``config.yaml``), a public reimplementation that reports 1.45 % test error
(the paper: 1.36 %): the zoo's ``forward_forward`` network (3 × 1000 ReLU, normalised
between layers, a linear classifier on layers 2 and 3 with the neutral label), SGD with
momentum 0.9 at 1e-3 and weight decay 3e-4, the classifier at 1e-2 and 3e-3, a
linear cool-down over the second half, batch 100, 100 epochs, 50,000 training images
(the rest of the training set held out, as loeweX's validation split), pixels in [0, 1],
tested on the 10k test images after the last epoch. LeCun-normal W (loeweX:
N(0, 1/fan_out)).

``--config=configs/paper/hinton2022.py`` (the label by the classifier, as loeweX) or
``:goodness`` (the label whose input gives the most goodness, Hinton's other test).
"""

from bioflax.experiment.configs.paper import mnist_protocol

PREDICTIONS = ("classifier", "goodness")


def get_config(prediction: str = "classifier"):
    if prediction not in PREDICTIONS:
        raise ValueError(f"hinton2022 has no {prediction!r} setting; choose one of "
                         f"{list(PREDICTIONS)}")
    config = mnist_protocol(batch_size=100)
    config.data.flatten = False  # the network flattens
    config.data.val_split = 1 / 6  # 50,000 training images, 10,000 held out
    config.model.name = "forward_forward"
    config.model.rule = "bp"
    config.model.loss = "softmax_cross_entropy"
    config.procedure.name = "forward_forward"
    config.procedure.forward_forward.prediction = prediction
    config.optimizer.learning_rate = 1e-3
    config.optimizer.momentum = 0.9
    config.optimizer.weight_decay = 3e-4
    config.optimizer.groups = (("classifier/*", 1e-2, 3e-3),)
    config.optimizer.schedule = "linear_cooldown"
    config.optimizer.decay_at = (0.5,)
    config.alignment.enabled = False  # no gradient to compare: every loss is a layer's own
    config.training.epochs = 100
    config.training.checkpoint_every_epochs = 10.0
    return config
