"""The models a config names (``model.name``): the MLP and the zoo's networks, converted to
the config's rule."""

import functools
from typing import Callable

from flax import linen as nn

from bioflax import converter, rules, zoo
from bioflax.experiment import initializers
from bioflax.models import BioNeuralNetwork


def _rule(model_config) -> rules.Rule:
    """The config's rule with the options that rule takes."""
    name = model_config.rule
    options = {} if name == "bp" else {"feedback_init": initializers.get(
        model_config.feedback_init, model_config.feedback_init_scale)}
    if name == "interpolate_fa_bp":
        options["interpolation_factor"] = model_config.interpolation_factor
    if name == "dfa":
        options["conv_feedback"] = model_config.dfa_conv_feedback
    return rules.get_rule(name, **options)


def _mlp(model_config, num_outputs: int) -> nn.Module:
    """:class:`BioNeuralNetwork` from ``hidden_layers``, ``activations`` and the inits."""
    input_init = model_config.input_layer_kernel_init
    return BioNeuralNetwork(
        hidden_layers=tuple(model_config.hidden_layers),
        activations=tuple(model_config.activations), features=num_outputs,
        rule=model_config.rule, interpolation_factor=model_config.interpolation_factor,
        kernel_init=initializers.get(model_config.kernel_init, model_config.kernel_init_scale),
        feedback_init=initializers.get(model_config.feedback_init,
                                       model_config.feedback_init_scale),
        input_layer_kernel_init=(None if input_init is None else initializers.get(
            input_init, model_config.kernel_init_scale)))


def _converted_zoo_model(name: str, model_config, num_outputs: int) -> nn.Module:
    """The zoo's ``name`` with every Dense and Conv trained by ``rule``
    (``bioflax.convert``), ``keep_backprop`` layers excepted, its convolutions run by
    ``conv_impl``; a language model's output tied to its embedding as
    ``tie_embeddings`` says."""
    options = ({"tie_embeddings": model_config.tie_embeddings}
               if name in zoo.LANGUAGE_MODELS else {})
    model = zoo.get_model(name, num_classes=num_outputs, kernel_init=initializers.get(
        model_config.kernel_init, model_config.kernel_init_scale), **options)
    return converter.convert(model, _rule(model_config),
                             keep_backprop=tuple(model_config.keep_backprop),
                             conv_impl=model_config.conv_impl,
                             feedback_points=tuple(model_config.feedback_points))


# The models a config names (``model.name``): builders of ``(model config, outputs)``.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": _mlp,
    **{name: functools.partial(_converted_zoo_model, name) for name in zoo.ZOO},
}


def build(model_config, num_outputs: int) -> nn.Module:
    """The model ``model_config.name`` of :data:`MODELS`."""
    if model_config.name not in MODELS:
        raise ValueError(f"Unknown model {model_config.name!r}; choose one of {list(MODELS)}.")
    return MODELS[model_config.name](model_config, num_outputs)
