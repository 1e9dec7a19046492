"""The MLP of every experiment, built from the feedback layers, and the activations by name.

Layer ``i`` of a :class:`BioNeuralNetwork` is named ``layer_i`` whatever the rule, so the
parameters of an FA network and of its backprop twin have the same tree; the backprop
reference of any network is the same ``apply`` inside :func:`bioflax.layers.exact_backprop`.
"""

from typing import Callable, Optional, Sequence

import jax
from flax import linen as nn

from bioflax import layers, rules

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "tanh": nn.tanh,
    "sigmoid": nn.sigmoid,
    "identity": lambda x: x,
    "gelu": nn.gelu,
    "elu": nn.elu,
    "leaky_relu": nn.leaky_relu,
    "softplus": nn.softplus,
    "silu": nn.silu,
}

MODES = tuple(rules.RULES)


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"Unknown activation {name!r}; choose one of "
                         f"{sorted(ACTIVATIONS)}.") from None


class BioNeuralNetwork(nn.Module):
    """An MLP trained by the rule ``mode``: ``hidden_layers`` widths, then ``features`` outputs.

    ``mode`` is a rule of :data:`bioflax.rules.RULES`; DFA uses the chain layers
    ``RandomDenseLinearDFAHidden``/``Output``. ``activations[i]`` (a name from
    :data:`ACTIVATIONS`) follows hidden layer ``i``; the output layer is linear. Inputs of
    any shape are flattened to ``(batch, -1)``. ``interpolation_factor`` is λ of
    ``interpolate_fa_bp`` (1 = FA, 0 = BP).
    ``input_layer_kernel_init``, when given, initialises ``layer_0``'s W instead of
    ``kernel_init`` (Nøkland's FA starts the input layer random and the others at zero).
    """

    hidden_layers: Sequence[int]
    activations: Sequence[str]
    features: int
    mode: str = "bp"
    interpolation_factor: float = 0.5
    kernel_init: layers.Initializer = layers.default_kernel_init
    feedback_init: layers.Initializer = layers.default_kernel_init
    input_layer_kernel_init: Optional[layers.Initializer] = None

    def _kernel_init(self, index: int) -> layers.Initializer:
        if index == 0 and self.input_layer_kernel_init is not None:
            return self.input_layer_kernel_init
        return self.kernel_init

    def _dense(self, features: int, index: int) -> nn.Module:
        rule = rules.get_rule_with(self.mode, feedback_init=self.feedback_init,
                                   interpolation_factor=self.interpolation_factor)
        return layers.RuleDense(features, kernel_init=self._kernel_init(index),
                                feedback_init=self.feedback_init, rule=rule,
                                name=f"layer_{index}")

    @nn.compact
    def __call__(self, x):
        if self.mode not in MODES:
            raise ValueError(f"Unknown mode {self.mode!r}; choose one of {list(MODES)}.")
        if len(self.hidden_layers) != len(self.activations):
            raise ValueError(
                f"hidden_layers {tuple(self.hidden_layers)} and activations "
                f"{tuple(self.activations)} must have the same length.")
        x = x.reshape((x.shape[0], -1))
        for index, (width, name) in enumerate(zip(self.hidden_layers, self.activations)):
            activation = get_activation(name)
            if self.mode == "dfa":
                x = layers.RandomDenseLinearDFAHidden(
                    width, self.features, activation, kernel_init=self._kernel_init(index),
                    feedback_init=self.feedback_init, name=f"layer_{index}")(x)
            else:
                x = activation(self._dense(width, index)(x))
        index = len(self.hidden_layers)
        if self.mode == "dfa":
            return layers.RandomDenseLinearDFAOutput(
                self.features, kernel_init=self._kernel_init(index), name=f"layer_{index}")(x)
        return self._dense(self.features, index)(x)
