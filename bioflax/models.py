"""The MLP of every experiment, built from the feedback layers, and the activations by name.

Layer ``i`` of a :class:`BioNeuralNetwork` is named ``layer_i`` whatever the rule, so the
parameters of an FA network and of its backprop twin have the same tree; the backprop
reference of any network is the same ``apply`` inside :func:`bioflax.layers.exact_backprop`.
"""

import warnings
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


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"Unknown activation {name!r}; choose one of "
                         f"{sorted(ACTIVATIONS)}.") from None


class BioNeuralNetwork(nn.Module):
    """An MLP trained by ``rule``: ``hidden_layers`` widths, then ``features`` outputs.

    ``rule`` is a name of :data:`bioflax.rules.RULES` (DFA included); every layer is a
    :class:`bioflax.layers.RuleDense` named ``layer_i``. ``activations[i]`` (a name from
    :data:`ACTIVATIONS`) follows hidden layer ``i``; the output layer is linear. Inputs of
    any shape are flattened to ``(batch, -1)``. ``interpolation_factor`` is λ of
    ``interpolate_fa_bp`` (1 = FA, 0 = BP); ``feedback_init`` draws every rule's ``B``.
    ``input_layer_kernel_init``, when given, initialises ``layer_0``'s W instead of
    ``kernel_init`` (Nøkland's FA starts the input layer random and the others at zero).
    ``mode`` is the deprecated old name of ``rule``: when given, it is the rule (with a
    warning).
    """

    hidden_layers: Sequence[int]
    activations: Sequence[str]
    features: int
    rule: str = "bp"
    interpolation_factor: float = 0.5
    kernel_init: layers.Initializer = layers.default_kernel_init
    feedback_init: layers.Initializer = layers.default_kernel_init
    input_layer_kernel_init: Optional[layers.Initializer] = None
    mode: Optional[str] = None

    def _kernel_init(self, index: int) -> layers.Initializer:
        if index == 0 and self.input_layer_kernel_init is not None:
            return self.input_layer_kernel_init
        return self.kernel_init

    def _rule(self) -> rules.Rule:
        name = self.rule
        if self.mode is not None:
            warnings.warn("BioNeuralNetwork(mode=...) is deprecated: use rule=...",
                          DeprecationWarning, stacklevel=3)
            name = self.mode
        options = {} if name == "bp" else {"feedback_init": self.feedback_init}
        if name == "interpolate_fa_bp":
            options["interpolation_factor"] = self.interpolation_factor
        return rules.get_rule(name, **options)

    @nn.compact
    def __call__(self, x):
        if len(self.hidden_layers) != len(self.activations):
            raise ValueError(
                f"hidden_layers {tuple(self.hidden_layers)} and activations "
                f"{tuple(self.activations)} must have the same length.")
        rule = self._rule()
        x = x.reshape((x.shape[0], -1))
        for index, (width, name) in enumerate(zip(self.hidden_layers, self.activations)):
            x = layers.RuleDense(width, rule, activation=get_activation(name),
                                 final_output_dim=self.features,
                                 kernel_init=self._kernel_init(index),
                                 feedback_init=self.feedback_init, name=f"layer_{index}")(x)
        index = len(self.hidden_layers)
        return layers.RuleDense(self.features, rule, kernel_init=self._kernel_init(index),
                                feedback_init=self.feedback_init, name=f"layer_{index}")(x)
