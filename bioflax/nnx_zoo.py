"""Flax NNX twins of models of :mod:`bioflax.models` and :mod:`bioflax.zoo`, written in plain
NNX (``nnx.Linear``, ``nnx.Conv``, ``nnx.relu``) so that ``bioflax.convert`` gives their
layers a rule: the same layers, shapes, parameter names and initialisers as the Linen
models, built initialised from ``rngs`` (``in_features``: the size of the input's last
axis, which NNX layers take when built). :data:`NNX_ZOO` names the zoo's."""

import functools
from typing import Callable, Optional, Sequence

import jax
from flax import nnx

from bioflax import layers, zoo
from bioflax.models import get_activation


class MLP(nnx.Module):
    """:class:`bioflax.models.BioNeuralNetwork`'s MLP, unconverted: ``hidden_layers``
    widths, each followed by its activation of ``activations`` (names of
    :data:`bioflax.models.ACTIVATIONS`), then ``features`` linear outputs; layer ``i`` is
    ``layer_i``; inputs are flattened to ``(batch, in_features)``.
    ``input_layer_kernel_init``, when given, initialises ``layer_0``'s W."""

    def __init__(self, in_features: int, hidden_layers: Sequence[int],
                 activations: Sequence[str], features: int, *,
                 kernel_init: layers.Initializer = layers.default_kernel_init,
                 input_layer_kernel_init: Optional[layers.Initializer] = None,
                 rngs: nnx.Rngs):
        if len(hidden_layers) != len(activations):
            raise ValueError(f"hidden_layers {tuple(hidden_layers)} and activations "
                             f"{tuple(activations)} must have the same length.")
        self.activations = tuple(activations)
        widths = (in_features, *hidden_layers, features)
        for index, (fan_in, fan_out) in enumerate(zip(widths, widths[1:])):
            init = (input_layer_kernel_init if index == 0 and input_layer_kernel_init
                    is not None else kernel_init)
            setattr(self, f"layer_{index}",
                    nnx.Linear(fan_in, fan_out, kernel_init=init, rngs=rngs))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape((x.shape[0], -1))
        for index, activation in enumerate(self.activations):
            x = get_activation(activation)(getattr(self, f"layer_{index}")(x))
        return getattr(self, f"layer_{len(self.activations)}")(x)


class LeNet5(nnx.Module):
    """:class:`bioflax.zoo.LeNet5` (biotorch's MNIST LeNet on 32×32 images):
    ``conv1``-``conv3`` 5×5 VALID with ReLU, max-pooled after the first two, then ``fc1``
    (ReLU) and ``fc2``, Xavier-uniform W and zero biases by default."""

    def __init__(self, in_features: int = 1, num_classes: int = 10,
                 kernel_init: zoo.Initializer = zoo.xavier_uniform, *, rngs: nnx.Rngs):
        conv = functools.partial(nnx.Conv, kernel_size=(5, 5), padding="VALID",
                                 kernel_init=kernel_init, rngs=rngs)
        self.conv1 = conv(in_features, 6)
        self.conv2 = conv(6, 16)
        self.conv3 = conv(16, 120)
        self.fc1 = nnx.Linear(120, 84, kernel_init=kernel_init, rngs=rngs)
        self.fc2 = nnx.Linear(84, num_classes, kernel_init=kernel_init, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = zoo.max_pool(nnx.relu(self.conv1(x)))
        x = zoo.max_pool(nnx.relu(self.conv2(x)))
        x = nnx.relu(self.conv3(x)).reshape((x.shape[0], -1))
        return self.fc2(nnx.relu(self.fc1(x)))


# The zoo models (names of bioflax.zoo.ZOO) with an NNX twin:
# builders of (in_features, num_classes=, kernel_init=, rngs=).
NNX_ZOO: dict[str, Callable[..., nnx.Module]] = {
    "lenet5": LeNet5,
}
