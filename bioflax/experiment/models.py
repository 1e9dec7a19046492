"""The models a config names (``model.name``): the MLP and the zoo's networks, converted to
the config's rule, written in the config's Flax API (``model.api``)."""

import functools
import math
from typing import Callable, Union

import jax
import numpy as np
from flax import linen as nn
from flax import nnx

from bioflax import converter, nnx_zoo, rules, zoo
from bioflax.experiment import initializers
from bioflax.models import BioNeuralNetwork


def _rule(model_config) -> rules.Rule:
    """The config's rule with the options that rule takes."""
    name = model_config.rule
    options = {} if name == "bp" else {"feedback_init": initializers.get(
        model_config.feedback_init, model_config.feedback_init_scale)}
    if name == "interpolate_fa_bp":
        options["interpolation_factor"] = model_config.interpolation_factor
    if takes_dfa_options(model_config):
        options.update({option: model_config[field] for field, option in DFA_FIELDS.items()})
    return rules.get_rule(name, **options)


# The config fields of the DFA family's options (dfa, drtp), and the option each sets.
DFA_FIELDS = {"dfa_conv_feedback": "conv_feedback",
              "dfa_position_feedback": "position_feedback",
              "dfa_signal": "signal"}


def takes_dfa_options(model_config) -> bool:
    """Whether the config's model reads :data:`DFA_FIELDS`: a rule of the DFA family on any
    model but the Linen MLP (:class:`BioNeuralNetwork` builds its rule from the name)."""
    return (issubclass(rules.RULES.get(model_config.rule, rules.Rule),
                       rules.DirectFeedbackAlignment)
            and (model_config.name, model_config.api) != ("mlp", "linen"))


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


# The model-config fields a zoo model takes as its own fields, beyond ``num_classes`` and
# ``kernel_init`` (the others take none).
ZOO_FIELDS: dict[str, tuple[str, ...]] = {
    "transformer_lm": ("tie_embeddings",),
    "vit_mnist": ("pooling",),
}


def _converted_zoo_model(name: str, model_config, num_outputs: int) -> nn.Module:
    """The zoo's ``name`` with every Dense and Conv trained by ``rule``
    (``bioflax.convert``), ``keep_backprop`` layers excepted, its convolutions run by
    ``conv_impl``; a language model's output tied to its embedding as
    ``tie_embeddings`` says, a Vision Transformer pooled as ``pooling`` says."""
    options = {field: model_config[field] for field in ZOO_FIELDS.get(name, ())}
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


def _nnx_convert(model_config, model: nnx.Module, key: jax.Array,
                 example: np.ndarray) -> nnx.Module:
    """``model`` converted to the config's rule, its feedback weights drawn from
    ``key`` (DFA's shaped by ``example``)."""
    return converter.convert(model, _rule(model_config), rngs=nnx.Rngs(feedback=key),
                             example=example, keep_backprop=tuple(model_config.keep_backprop),
                             conv_impl=model_config.conv_impl,
                             feedback_points=tuple(model_config.feedback_points))


def _nnx_mlp(model_config, num_outputs: int, example: np.ndarray,
             key: jax.Array) -> nnx.Module:
    """:class:`bioflax.nnx_zoo.MLP` as :func:`_mlp` configures the Linen one, converted."""
    input_init = model_config.input_layer_kernel_init
    model = nnx_zoo.MLP(
        math.prod(example.shape[1:]), tuple(model_config.hidden_layers),
        tuple(model_config.activations), num_outputs,
        kernel_init=initializers.get(model_config.kernel_init, model_config.kernel_init_scale),
        input_layer_kernel_init=(None if input_init is None else initializers.get(
            input_init, model_config.kernel_init_scale)),
        rngs=nnx.Rngs(params=jax.random.fold_in(key, 0)))
    return _nnx_convert(model_config, model, jax.random.fold_in(key, 1), example)


def _converted_nnx_zoo_model(name: str, model_config, num_outputs: int, example: np.ndarray,
                             key: jax.Array) -> nnx.Module:
    """The NNX twin of the zoo's ``name`` (:data:`bioflax.nnx_zoo.NNX_ZOO`), converted as
    :func:`_converted_zoo_model` converts the Linen one."""
    model = nnx_zoo.NNX_ZOO[name](
        example.shape[-1], num_classes=num_outputs,
        kernel_init=initializers.get(model_config.kernel_init, model_config.kernel_init_scale),
        rngs=nnx.Rngs(params=jax.random.fold_in(key, 0)))
    return _nnx_convert(model_config, model, jax.random.fold_in(key, 1), example)


# The models of MODELS written in Flax NNX: builders of (model config, outputs, a batch of
# inputs, key).
NNX_MODELS: dict[str, Callable[..., nnx.Module]] = {
    "mlp": _nnx_mlp,
    **{name: functools.partial(_converted_nnx_zoo_model, name) for name in nnx_zoo.NNX_ZOO},
}

# The Flax APIs a config builds its model in (``model.api``): the models each has, and how
# one of them is built from (builder, model config, outputs, a batch of inputs, seed).
APIS: dict[str, tuple[dict[str, Callable], Callable[..., Union[nn.Module, nnx.Module]]]] = {
    "linen": (MODELS, lambda builder, model_config, num_outputs, example, seed: builder(
        model_config, num_outputs)),
    "nnx": (NNX_MODELS, lambda builder, model_config, num_outputs, example, seed: builder(
        model_config, num_outputs, np.asarray(example), jax.random.key(seed))),
}


def check_api(model_config) -> None:
    """Raises a ValueError unless ``model_config.api`` is an API of :data:`APIS` that has
    the model ``model_config.name``."""
    if model_config.api not in APIS:
        raise ValueError(f"Unknown model.api {model_config.api!r}; choose one of {list(APIS)}.")
    models = APIS[model_config.api][0]
    if model_config.name not in models:
        raise ValueError(f"model {model_config.name!r} has no {model_config.api} version; "
                         f"those that have one are {list(models)}")


def build(model_config, num_outputs: int, example=None,
          seed: int = 0) -> Union[nn.Module, nnx.Module]:
    """The model ``model_config.name`` of :data:`MODELS` in the API ``model_config.api``;
    an NNX model is built initialised from ``seed``, for inputs like ``example`` (a batch),
    which a Linen model does not need."""
    if model_config.name not in MODELS:
        raise ValueError(f"Unknown model {model_config.name!r}; choose one of {list(MODELS)}.")
    check_api(model_config)
    models, build_in_api = APIS[model_config.api]
    return build_in_api(models[model_config.name], model_config, num_outputs, example, seed)
