"""Kolen-Pollack MLP on MNIST: 784-500-500-10 ReLU, with the weight decay KP needs."""

from bioflax.experiment.configs import mnist_mlp


def get_config():
    config = mnist_mlp.get_config("kp", "relu")
    config.optimizer.weight_decay = 1e-4
    return config
