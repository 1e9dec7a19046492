"""Optimizers, initialisers, losses and data sets are chosen by name from one registry each,
and the config validation allows exactly those names."""

import jax
import ml_collections
import numpy as np
import optax
import pytest

from bioflax import converter, losses, rules, zoo
from bioflax.experiment import datasets as data
from bioflax.experiment import initializers, models, optimizers
from bioflax.experiment import validate as config_validation
from bioflax.experiment.errors import ConfigError
from bioflax.experiment.configs import default as default_config


def optimizer_config(**fields) -> ml_collections.ConfigDict:
    """Every field ``optimizers.build`` reads: plain SGD at a constant rate."""
    return ml_collections.ConfigDict({
        "name": "sgd", "learning_rate": 0.05, "momentum": 0.0, "rmsprop_decay": 0.99,
        "weight_decay": 0.0, "schedule": "constant", "decay_at": (0.5, 0.75),
        "decay_factor": 0.1, "warmup_steps": 0, "trainable": (), "nesterov": False,
        "groups": (), **fields})


def test_parameter_groups_train_at_their_own_rate_and_decay():
    config = optimizer_config(learning_rate=0.1, weight_decay=0.5,
                              groups=(("head/*", 1.0, 0.0),))
    optimizer = optimizers.build(config, total_steps=10)
    params = {"head": {"kernel": np.ones(2, np.float32)},
              "body": {"kernel": np.ones(2, np.float32)}}
    updates, _ = optimizer.update(jax.tree_util.tree_map(np.ones_like, params),
                                  optimizer.init(params), params)
    np.testing.assert_allclose(updates["head"]["kernel"], -1.0 * 1.0)  # its rate, no decay
    np.testing.assert_allclose(updates["body"]["kernel"], -0.1 * (1 + 0.5))
    config.groups = (("Head/*", 1.0, 0.0),)
    with pytest.raises(ValueError, match="optimizer.groups pattern 'Head/\\*' matches no"):
        optimizers.build(config, total_steps=10).init(params)


def test_linear_cooldown_is_constant_then_falls_linearly_to_zero():
    config = optimizer_config(learning_rate=0.2, schedule="linear_cooldown", decay_at=(0.5,))
    optimizer = optimizers.build(config, total_steps=10)
    params = np.array([0.0], np.float32)
    state = optimizer.init(params)
    rates = []
    for _ in range(10):
        _, state = optimizer.update(np.ones(1, np.float32), state, params)
        rates.append(float(optax.tree_utils.tree_get(state, "hyperparams")["learning_rate"]))
    # the rate each update used: steps 0..4 at 0.2, then 0.2·(1 − j/5) at step 5 + j
    np.testing.assert_allclose(rates[:5], [0.2] * 5, rtol=1e-6)
    np.testing.assert_allclose(rates[5:], [0.2 * (1 - j / 5) for j in range(5)], atol=1e-7)


def test_adamw_decays_after_the_adam_step_so_equal_gradients_keep_the_difference_shrinking():
    """KP under Adam: W and B with equal gradients move by the same Adam step, and the
    decoupled decay multiplies W − B by (1 − lr·wd) every step."""
    config = optimizer_config(name="adamw", learning_rate=0.01, weight_decay=2.0)
    optimizer = optimizers.build(config, total_steps=10)
    params = {"w": np.array([1.0, -0.5], np.float32), "b": np.array([0.2, 0.3], np.float32)}
    state = optimizer.init(params)
    for gradient in (np.array([0.5, -1.0]), np.array([-2.0, 0.1])):
        grads = {"w": gradient.astype(np.float32), "b": gradient.astype(np.float32)}
        difference = params["w"] - params["b"]
        updates, state = optimizer.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        np.testing.assert_allclose(params["w"] - params["b"], difference * (1 - 0.01 * 2.0),
                                   rtol=1e-5)


def test_trainable_patterns_freeze_every_other_parameter_and_refuse_a_pattern_matching_none():
    config = optimizer_config(learning_rate=0.1, weight_decay=0.5, trainable=("head/*",))
    optimizer = optimizers.build(config, total_steps=10)
    params = {"head": {"kernel": np.ones(2, np.float32)},
              "body": {"kernel": np.ones(2, np.float32)}}
    state = optimizer.init(params)
    grads = jax.tree_util.tree_map(np.ones_like, params)
    updates, _ = optimizer.update(grads, state, params)
    np.testing.assert_allclose(updates["head"]["kernel"], -0.1 * (1 + 0.5))  # SGD, L2 decay
    np.testing.assert_array_equal(updates["body"]["kernel"], 0.0)
    config.trainable = ("Head/*",)
    with pytest.raises(ValueError, match="optimizer.trainable pattern 'Head/\\*' matches no "
                                         "parameter.*head/kernel"):
        optimizers.build(config, total_steps=10).init(params)


def test_unscaled_initializers_refuse_a_scale_instead_of_ignoring_it():
    key, shape = jax.random.key(0), (30, 20)
    np.testing.assert_array_equal(initializers.get("lecun_normal", 1.0)(key, shape),
                                  jax.nn.initializers.lecun_normal()(key, shape))
    for name in initializers.UNSCALED:
        with pytest.raises(ValueError, match=f"Initializer '{name}' takes no scale"):
            initializers.get(name, 2.0)
    config = default_config.get_config()
    config.model.feedback_init, config.model.feedback_init_scale = "zeros", 0.5
    with pytest.raises(ConfigError, match="model.feedback_init_scale"):
        config_validation.validate(config)


def test_fan_in_uniform_and_zeros_initializers():
    weights = np.asarray(initializers.get("fan_in_uniform", 2.0)(jax.random.key(0), (400, 300)))
    bound = 2.0 / np.sqrt(400)  # U[-s/√fan_in, s/√fan_in], fan_in = 400
    assert np.abs(weights).max() <= bound and np.abs(weights).max() > 0.99 * bound
    np.testing.assert_allclose(weights.var(), bound ** 2 / 3, rtol=0.02)
    zeros = initializers.get("zeros", 1.0)(jax.random.key(0), (3, 2))
    np.testing.assert_array_equal(zeros, np.zeros((3, 2)))
    uniform = np.asarray(initializers.get("uniform", 0.3)(jax.random.key(1), (200, 200)))
    assert uniform.min() >= -0.3 and uniform.max() <= 0.3
    np.testing.assert_allclose(uniform.var(), 0.3 ** 2 / 3, rtol=0.03)


def test_rmsprop_divides_by_the_root_of_the_running_square_plus_epsilon():
    config = optimizer_config()
    config.name, config.learning_rate, config.rmsprop_decay = "rmsprop", 0.01, 0.9
    optimizer = optimizers.build(config, total_steps=10)
    params = np.array([1.0, -2.0], np.float32)
    state = optimizer.init(params)
    nu, expected = np.zeros(2), params.astype(np.float64)
    for gradient in (np.array([0.5, -1.0]), np.array([2.0, 0.1])):
        nu = 0.9 * nu + 0.1 * gradient ** 2
        expected = expected - 0.01 * gradient / (np.sqrt(nu) + 1e-8)
        updates, state = optimizer.update(gradient.astype(np.float32), state, params)
        params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(params, expected, rtol=1e-5)


def test_sgd_with_decay_first_and_a_cosine_schedule_after_warm_up():
    config = optimizer_config()
    config.update(name="sgd", learning_rate=0.1, momentum=0.0, weight_decay=0.5,
                  schedule="cosine", warmup_steps=2)
    optimizer = optimizers.build(config, total_steps=6)
    w = np.array([1.0], np.float32)
    state = optimizer.init(w)
    # lr: warm-up 0, 0.05, then cosine over 4 steps from 0.1: 0.1, 0.0854, 0.05, 0.0146.
    rates = [0.0, 0.05] + [0.05 * (1 + np.cos(np.pi * k / 4)) for k in range(4)]
    expected = 1.0
    for rate in rates:
        gradient = np.array([2.0], np.float32)
        expected -= rate * (2.0 + 0.5 * expected)
        updates, state = optimizer.update(gradient, state, w)
        w = optax.apply_updates(w, updates)
    np.testing.assert_allclose(w, [expected], rtol=1e-5)


@pytest.mark.parametrize("field, registry", [("name", optimizers.OPTIMIZERS),
                                             ("schedule", optimizers.SCHEDULES)])
def test_an_unknown_optimizer_or_schedule_name_is_refused_not_replaced(field, registry):
    config = optimizer_config()
    config[field] = "adagrad"
    with pytest.raises(ValueError, match=rf"Unknown optimizer.{field} 'adagrad'.*"
                                         rf"{list(registry)[0]}"):
        optimizers.build(config, total_steps=10)
    with pytest.raises(ValueError, match="Unknown initializer 'ones'"):
        initializers.get("ones")


VIT = {"model.name": "vit_mnist", "data.flatten": False}
DFA_VIT = {**VIT, "model.rule": "dfa"}  # a model and rule that read the DFA options


@pytest.mark.parametrize("field, registry, settings", [
    ("optimizer.name", optimizers.OPTIMIZERS, {}),
    ("optimizer.schedule", optimizers.SCHEDULES, {}),
    ("model.kernel_init", initializers.INITIALIZERS, {}),
    ("model.feedback_init", initializers.INITIALIZERS, {}),
    ("model.loss", losses.LOSSES["classification"], {}),
    ("data.dataset", data.DATASETS, {}),
    ("model.dfa_conv_feedback", converter.DFA_CONV_FEEDBACK, DFA_VIT),
    ("model.dfa_position_feedback", converter.DFA_POSITION_FEEDBACK, DFA_VIT),
    ("model.pooling", zoo.VIT_POOLINGS, VIT),
    ("model.conv_impl", converter.CONV_IMPLS, {}),
])
def test_validation_allows_exactly_the_registered_names(field, registry, settings,
                                                       monkeypatch, tmp_path):
    section, name = field.split(".")
    text = tmp_path / "text.txt"
    text.write_text("a text long enough for a window of every split. " * 100)

    def config_with(choice):
        config = default_config.get_config()
        for setting, value in {**settings, field: choice}.items():
            config[setting.split(".")[0]][setting.split(".")[1]] = value
        return config

    for choice in registry:
        config = config_with(choice)
        if choice in ("teacher", "sinreg"):
            config.data.input_dim = config.data.output_dim = 1
        if choice == "text":  # a file, and a language model to train on it
            config.data.text_path, config.model.name = str(text), "transformer_lm"
        config_validation.validate(config)
    config = config_with("registered_later")
    with pytest.raises(ConfigError, match=f"{field} = 'registered_later'"):
        config_validation.validate(config)
    monkeypatch.setitem(registry, "registered_later", next(iter(registry.values())))
    config_validation.validate(config)


@pytest.mark.parametrize("choice, conv2_feedback", [("dense", (14 * 14 * 6, 10)),
                                                    ("shared_kernel", (5, 5, 6, 10))])
def test_the_dfa_feedback_choice_reaches_the_zoo_model(choice, conv2_feedback):
    config = default_config.get_config()
    config.model.name, config.model.rule, config.model.dfa_conv_feedback = "lenet5", "dfa", choice
    model = models.build(config.model, num_outputs=10)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jax.numpy.zeros((1, 32, 32, 1))))
    feedback = {name: value["output_feedback"].shape for name, value in shapes["feedback"].items()}
    # conv2 reads the pooled 14×14×6 map; fc1 (a Dense layer) always takes a dense B
    assert feedback["conv2"] == conv2_feedback
    assert feedback["fc1"] == (120, 10)


@pytest.mark.parametrize("position_feedback, pooling, block_feedback", [
    ("independent", "cls", (17 * 64, 10)), ("shared", "mean", (64, 10))])
def test_the_vit_pooling_and_position_feedback_reach_the_zoo_model(
        position_feedback, pooling, block_feedback):
    config = default_config.get_config()
    config.model.name, config.model.rule = "vit_mnist", "dfa"
    config.model.feedback_points = ("block*",)
    config.model.dfa_position_feedback, config.model.pooling = position_feedback, pooling
    model = models.build(config.model, num_outputs=10)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                               jax.numpy.zeros((1, 28, 28, 1)), train=False))
    assert shapes["feedback"]["block1"]["output_feedback"].shape == block_feedback
    assert ("cls_token" in shapes["params"]) == (pooling == "cls")


def test_a_marked_primitive_leaves_the_shared_one_convertible():
    # shared_kernel_feedback marks B's own convolution; the primitive every other Conv uses
    # must stay convertible, so a later conversion still gives each Conv its rule.
    import bioflax  # pylint: disable=import-outside-toplevel
    from bioflax import zoo  # pylint: disable=import-outside-toplevel
    marked = converter.mark_rule_op(jax.lax.conv_general_dilated)
    assert converter.is_rule_op(marked) and not converter.is_rule_op(jax.lax.conv_general_dilated)
    x = jax.numpy.zeros((1, 32, 32, 1))
    bioflax.convert(zoo.LeNet5(), "dfa", conv_feedback="shared_kernel").init(jax.random.key(0), x)
    shapes = jax.eval_shape(lambda: bioflax.convert(zoo.LeNet5(), "fa").init(jax.random.key(0), x))
    assert {"conv1", "conv2", "conv3"} <= set(shapes["feedback"])


def test_zoo_models_run_the_configs_conv_impl():
    config = default_config.get_config()
    assert config.model.conv_impl == "auto"
    config.model.name = "lenet5"
    for conv_impl in converter.CONV_IMPLS:
        config.model.conv_impl = conv_impl
        assert models.build(config.model, 10).conv_impl == conv_impl
