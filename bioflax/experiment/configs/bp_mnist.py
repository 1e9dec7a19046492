"""Backprop MLP on MNIST: 784-500-500-10 ReLU (see mnist_mlp.py)."""

from bioflax.experiment.configs import mnist_mlp


def get_config():
    return mnist_mlp.get_config("bp", "relu")
