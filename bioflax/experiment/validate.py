"""Checks a whole config before any data is loaded or any model compiled.

Each problem raises :class:`bioflax.errors.ConfigError` naming the field, the bad value
and what is allowed.
"""

import logging
import numbers

import jax
import ml_collections

from bioflax import converter, losses, procedures, rules, zoo
from bioflax import models as bio_models
from bioflax.experiment.configs import default as default_config
from bioflax.experiment.errors import ConfigError
from bioflax.experiment import datasets as data
from bioflax.experiment import models
from bioflax.trainer import EarlyStopping, arrays, make_mesh
from bioflax.experiment.initializers import INITIALIZERS, UNSCALED
from bioflax.experiment.optimizers import OPTIMIZERS, SCHEDULES


def _choice(config, field: str, allowed) -> None:
    value = _get(config, field)
    if value not in allowed:
        raise ConfigError(field, value, f"choose one of {list(allowed)}")


def _get(config, field: str):
    node = config
    for part in field.split("."):
        node = node[part]
    return node


def _library(config, field: str, check) -> None:
    """Runs ``check()``, the library's own check of ``field`` (a constructor, a check
    function); its ValueError becomes the ConfigError of ``field``, so each rule is written
    once, where the library needs it."""
    try:
        check()
    except ValueError as error:
        raise ConfigError(field, _get(config, field), str(error).rstrip(".")) from None


def _positive(config, field: str, integer: bool = True, allow_zero: bool = False) -> None:
    value = _get(config, field)
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind) or value < 0 or (
            value == 0 and not allow_zero):
        what = "an integer" if integer else "a number"
        raise ConfigError(field, value, f"must be {what} {'>= 0' if allow_zero else '> 0'}")


def num_outputs(config: ml_collections.ConfigDict) -> int:
    """The network's output width that the data set implies."""
    return data.DATASETS[config.data.dataset].num_outputs(config.data)


def apply_deprecated_mode(config: ml_collections.ConfigDict) -> None:
    """``model.mode``, the old name of ``model.rule``: when a config (or a command line's
    ``--config.model.mode=fa``) sets it, log a deprecation warning and use it as the rule."""
    mode = config.model.get("mode")
    if mode is None:
        return
    if config.model.rule not in ("bp", mode):
        raise ConfigError("model.mode", mode, f"it is the deprecated name of model.rule, which "
                          f"says {config.model.rule!r}: set only model.rule")
    logging.warning("model.mode is deprecated: set model.rule = %r instead.", mode)
    config.model.rule, config.model.mode = mode, None


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Raises ConfigError for the first field that cannot work; returns None otherwise."""
    apply_deprecated_mode(config)
    _validate_choices(config)
    _validate_model(config)
    _validate_training(config)
    _validate_optimizer(config)
    _validate_data(config)
    _validate_devices(config, num_devices)
    _validate_compiler_options(config)


def _validate_choices(config) -> None:
    """Every field that names an entry of a registry."""
    _choice(config, "data.dataset", data.DATASETS)
    _choice(config, "model.name", models.MODELS)
    _choice(config, "model.api", models.APIS)
    _choice(config, "model.rule", rules.RULES)
    _choice(config, "optimizer.name", OPTIMIZERS)
    _choice(config, "optimizer.schedule", SCHEDULES)
    _choice(config, "procedure.name", procedures.PROCEDURES)
    _library(config, f"procedure.{config.procedure.name}", lambda: procedures.get_procedure(
        config.procedure.name, **config.procedure.get(config.procedure.name, {})))
    _choice(config, "model.kernel_init", INITIALIZERS)
    _choice(config, "model.feedback_init", INITIALIZERS)
    _choice(config, "model.dfa_conv_feedback", converter.DFA_CONV_FEEDBACK)
    _choice(config, "model.dfa_position_feedback", converter.DFA_POSITION_FEEDBACK)
    _choice(config, "model.pooling", zoo.VIT_POOLINGS)
    _choice(config, "model.dfa_signal", rules.DFA_SIGNALS)
    _choice(config, "model.conv_impl", converter.CONV_IMPLS)
    if config.model.input_layer_kernel_init is not None:
        _choice(config, "model.input_layer_kernel_init", INITIALIZERS)
    _library(config, "training.early_stopping_mode",
             lambda: EarlyStopping(mode=config.training.early_stopping_mode))
    if config.model.loss is not None:
        _choice(config, "model.loss", losses.LOSSES[data.DATASET_PROBLEMS[config.data.dataset]])


def _validate_model(config) -> None:
    """The MLP's layer lists, the interpolation factor, the init scales."""
    hidden, activations = tuple(config.model.hidden_layers), tuple(config.model.activations)
    if len(hidden) != len(activations):
        raise ConfigError("model.activations", activations,
                          f"needs one activation per hidden layer, and model.hidden_layers = "
                          f"{hidden} has {len(hidden)}")
    for index, name in enumerate(activations):
        if name not in bio_models.ACTIVATIONS:
            raise ConfigError(f"model.activations[{index}]", name,
                              f"choose one of {sorted(bio_models.ACTIVATIONS)}")
    for index, width in enumerate(hidden):
        if isinstance(width, bool) or not isinstance(width, numbers.Integral) or width <= 0:
            raise ConfigError(f"model.hidden_layers[{index}]", width, "must be an integer > 0")
    _library(config, "model.name", lambda: models.check_api(config.model))
    if config.model.api == "nnx":
        _validate_nnx(config)
    if config.model.feedback_points and config.model.rule != "dfa":
        raise ConfigError("model.feedback_points", tuple(config.model.feedback_points),
                          "feedback points are DFA's (per-block DFA): set model.rule = 'dfa' "
                          "or leave them empty")
    _validate_unread(config)
    _library(config, "model.interpolation_factor", lambda: rules.InterpolateFABP(
        interpolation_factor=config.model.interpolation_factor))
    for field in ("model.kernel_init_scale", "model.feedback_init_scale"):
        _positive(config, field, integer=False)
    for init_field, scale_field in (("model.kernel_init", "model.kernel_init_scale"),
                                    ("model.input_layer_kernel_init", "model.kernel_init_scale"),
                                    ("model.feedback_init", "model.feedback_init_scale")):
        if _get(config, init_field) in UNSCALED and _get(config, scale_field) != 1:
            raise ConfigError(scale_field, _get(config, scale_field),
                              f"{init_field} = {_get(config, init_field)!r} takes no scale: "
                              "leave it at 1, or pick a scaled initializer")


def _validate_unread(config) -> None:
    """No model field set away from its default where the model or rule does not read it
    (a zoo model's own fields, the DFA options)."""
    defaults = default_config.get_config().model
    taken = set(models.ZOO_FIELDS.get(config.model.name, ()))
    unread = {field: f"model.name = {config.model.name!r} does not read it (the models that "
                     f"do: {[m for m, fields in models.ZOO_FIELDS.items() if field in fields]})"
              for fields in models.ZOO_FIELDS.values() for field in fields if field not in taken}
    if not models.takes_dfa_options(config.model):
        unread.update({field: f"model.rule = {config.model.rule!r} on model.name = "
                              f"{config.model.name!r} (api {config.model.api!r}) does not read "
                              "it: DFA's options reach the dfa and drtp rules of the zoo "
                              "models and of the NNX MLP"
                       for field in models.DFA_FIELDS})
    for field, why in unread.items():
        if config.model[field] != defaults[field]:
            raise ConfigError(f"model.{field}", config.model[field],
                              f"{why}; leave it at {defaults[field]!r}")


def _validate_nnx(config) -> None:
    """What an NNX model cannot do that a Linen one can."""
    if config.training.num_seeds > 1:
        raise ConfigError("training.num_seeds", config.training.num_seeds,
                          "an NNX model is built initialised from config.seed, one seed "
                          "per run: set training.num_seeds = 1 (and vary config.seed)")
    if config.model.rule == "dfa" and config.model.dfa_conv_feedback != "dense":
        raise ConfigError("model.dfa_conv_feedback", config.model.dfa_conv_feedback,
                          "NNX models take DFA with 'dense' conv feedback only")


def _validate_training(config) -> None:
    """Counts and periods of the loop, seeds, early stopping."""
    if config.training.num_seeds > 1 and not config.data.in_memory:
        raise ConfigError("training.num_seeds", config.training.num_seeds,
                          "several seeds at once need data.in_memory = True")
    for field in ("training.epochs", "training.num_seeds", "training.log_every_steps",
                  "training.checkpoint_every_steps", "training.keep_checkpoints",
                  "alignment.every_steps"):
        _positive(config, field)
    for field in ("training.limit_train_batches", "training.fast_dev_run",
                  "training.early_stopping_patience", "training.num_devices"):
        _positive(config, field, allow_zero=True)
    for field in ("training.log_every_epochs", "training.checkpoint_every_epochs",
                  "alignment.every_epochs"):
        if _get(config, field) is not None:
            _positive(config, field, integer=False)
    _library(config, "training.stopping_smoothing",
             lambda: EarlyStopping(smoothing=config.training.stopping_smoothing))


def _validate_optimizer(config) -> None:
    """Learning rate, schedule, momentum, decay."""
    if any(not 0.0 < fraction < 1.0 for fraction in config.optimizer.decay_at):
        raise ConfigError("optimizer.decay_at", config.optimizer.decay_at,
                          "fractions of the run, each in (0, 1)")
    _positive(config, "optimizer.decay_factor", integer=False)
    _positive(config, "optimizer.warmup_steps", allow_zero=True)
    _positive(config, "optimizer.learning_rate", integer=False)
    if not 0.0 <= config.optimizer.rmsprop_decay < 1.0:
        raise ConfigError("optimizer.rmsprop_decay", config.optimizer.rmsprop_decay,
                          "must lie in [0, 1)")
    for field in ("optimizer.momentum", "optimizer.weight_decay"):
        _positive(config, field, integer=False, allow_zero=True)


def _validate_data(config) -> None:
    """Batch sizes, normalisation, augmentation, resizing, streaming, the sizes of generated
    data sets, the validation split."""
    for field in ("data.batch_size", "data.eval_batch_size"):
        _positive(config, field)
    if config.data.normalize_std is not None:
        _positive(config, "data.normalize_std", integer=False)
    _positive(config, "data.random_crop_padding", allow_zero=True)
    images = isinstance(data.DATASETS[config.data.dataset], data.TFDSImages)
    for field in ("data.random_crop_padding", "data.random_flip"):
        if _get(config, field) and not images:
            raise ConfigError(field, _get(config, field),
                              f"data.dataset = {config.data.dataset!r} has no images to "
                              "augment")
        if _get(config, field) and config.data.in_memory:
            raise ConfigError(field, _get(config, field),
                              "augmentation runs in the tf.data pipeline: set "
                              "data.in_memory = False")
    if config.data.image_size is not None:
        _positive(config, "data.image_size")
        if not images or config.data.streaming:
            raise ConfigError("data.image_size", config.data.image_size,
                              "resizing applies to TFDS images loaded whole (not streamed)")
    if images and config.model.name != "mlp" and config.data.flatten:
        raise ConfigError("data.flatten", True, f"model.name = {config.model.name!r} takes "
                          "images (N, H, W, C): set data.flatten = False")
    if config.data.streaming and not images:
        raise ConfigError("data.streaming", True, f"data.dataset = {config.data.dataset!r} is "
                          "generated in memory; only TFDS data sets stream")
    if config.data.streaming and config.data.in_memory:
        raise ConfigError("data.streaming", True, "a streamed data set is read through tf.data: "
                          "set data.in_memory = False")
    if not images:
        for field in ("data.input_dim", "data.output_dim", "data.train_size",
                      "data.test_size"):
            _positive(config, field)
    if config.data.dataset == "sinreg":
        field = "data.input_dim" if config.data.input_dim != 1 else "data.output_dim"
        _library(config, field, lambda: data.check_sinreg_dims(config.data.input_dim,
                                                               config.data.output_dim))
    _library(config, "data.val_split", lambda: data.check_val_split(config.data.val_split))
    _validate_text(config)


def _validate_text(config) -> None:
    """The text data set and the language models: one needs the other; the file exists and
    each of its splits holds a window."""
    text = config.data.dataset == "text"
    if (config.model.name in zoo.LANGUAGE_MODELS) != text:
        raise ConfigError("model.name", config.model.name,
                          f"data.dataset = 'text' trains a language model, one of "
                          f"{list(zoo.LANGUAGE_MODELS)}, and they train only on it")
    if not text:
        return
    spec = data.DATASETS["text"]
    _library(config, "data.text_path", lambda: spec.check_path(config.data.text_path))
    _choice(config, "data.text_tokens", spec.token_kinds)
    _positive(config, "data.context_length")
    if config.data.text_stride is not None:
        _positive(config, "data.text_stride")
    _library(config, "data.text_test_fraction",
             lambda: spec.check_fraction(config.data.text_test_fraction))
    _library(config, "data.text_path", lambda: spec.read(config.data))  # UTF-8 characters
    _library(config, "data.context_length", lambda: spec.check_windows(config.data))


def _validate_devices(config, num_devices: int | None) -> None:
    """Devices that exist, and batches that split evenly over them."""
    _library(config, "training.num_devices",
             lambda: make_mesh(config.training.num_devices or None))
    devices = num_devices or config.training.num_devices or jax.device_count()
    for field in ("data.batch_size", "data.eval_batch_size"):
        _library(config, field, lambda f=field: arrays.check_batch_size(
            _get(config, f), devices, name=f))


def _validate_compiler_options(config) -> None:
    """XLA accepts ``compiler_options``: a trivial program compiles with them."""
    options = config.compiler_options.to_dict()
    if not options:
        return
    try:
        jax.jit(lambda x: x + 1, compiler_options=options).lower(0.0).compile()
    except jax.errors.JaxRuntimeError as error:
        reason = str(error).splitlines()[0]
        raise ConfigError("compiler_options", options,
                          f"XLA rejected them ({reason}); use names and values of XLA's "
                          "DebugOptions, or {} for XLA's defaults") from None
