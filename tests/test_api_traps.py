"""The Python API's traps (issue 38): each mistake is one clear error, or works as a
Keras/Lightning user expects."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import bioflax
from bioflax import alignment, losses
from bioflax.trainer import ArrayData, Task, Trainer


def quiet_trainer(**kwargs):
    return Trainer(progress_bar=False, report_progress=False, **kwargs)


class KerasStyle(nn.Module):
    """A model whose mode flag is Keras's ``training``."""

    @nn.compact
    def __call__(self, x, training: bool = False):
        x = nn.Dense(4)(x)
        x = nn.BatchNorm(use_running_average=not training, momentum=0.5)(x)
        return nn.Dense(2)(x)


class FlaxDropoutStyle(nn.Module):
    """A model whose mode flag is Flax Dropout's ``deterministic``."""

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        return nn.Dense(2)(nn.Dropout(0.5, deterministic=deterministic)(x))


def classification(n=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    return ArrayData(x, (x.sum(axis=1) > 0).astype(np.int32))


def test_a_training_flag_is_set_in_training_and_cleared_in_evaluation():
    data = classification()
    task = Task(KerasStyle(), losses.softmax_cross_entropy, optax.sgd(0.1))
    assert task.train_flag == "training"
    trainer = quiet_trainer()
    state = trainer.init_state(task, data.inputs[:1])
    initial_mean = np.asarray(state.model_state["batch_stats"]["BatchNorm_0"]["mean"])
    fitted = trainer.fit(task, data, batch_size=16, state=state).state
    # BatchNorm's running statistics moved: the model ran with training=True.
    assert not np.allclose(fitted.model_state["batch_stats"]["BatchNorm_0"]["mean"],
                           initial_mean)
    expected = KerasStyle().apply({"params": fitted.params, **fitted.model_state},
                                  data.inputs, training=False)
    np.testing.assert_allclose(trainer.predict(task, fitted, data.inputs), expected,
                               rtol=1e-5, atol=1e-6)


def test_a_deterministic_flag_is_cleared_in_training_and_set_in_evaluation():
    data = classification()
    task = Task(FlaxDropoutStyle(), losses.softmax_cross_entropy, optax.sgd(0.0))
    assert task.train_flag == "deterministic"
    trainer = quiet_trainer()
    state = trainer.init_state(task, data.inputs[:1])
    expected = FlaxDropoutStyle().apply({"params": state.params}, data.inputs,
                                        deterministic=True)
    np.testing.assert_allclose(trainer.predict(task, state, data.inputs), expected, rtol=1e-6)
    # At learning rate 0 the training loss differs from the evaluation loss only by dropout.
    history = trainer.fit(task, data, data, batch_size=32, state=state).history
    assert history[-1]["train/loss"] != pytest.approx(history[-1]["val/loss"], rel=1e-4)


class WrapperWithItsOwnFlag(nn.Module):
    """A user's wrapper with a ``module`` field and a ``train`` flag the inner one lacks."""

    module: nn.Module

    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dropout(0.5, deterministic=not train)(self.module(x))


class ForwardingWrapperWithItsOwnFlag(WrapperWithItsOwnFlag):
    """The same with ``**kwargs`` that it passes on to its ``module``."""

    @nn.compact
    def __call__(self, x, train: bool = False, **kwargs):
        return nn.Dropout(0.5, deterministic=not train)(self.module(x, **kwargs))


def test_a_wrappers_own_flag_is_found_and_a_converted_models_through_it():
    for wrapper in (WrapperWithItsOwnFlag, ForwardingWrapperWithItsOwnFlag):
        assert Task(wrapper(nn.Dense(2)), losses.softmax_cross_entropy,
                    optax.sgd(0.1)).train_flag == "train"
    converted = bioflax.convert(FlaxDropoutStyle(), "fa")
    assert Task(converted, losses.softmax_cross_entropy,
                optax.sgd(0.1)).train_flag == "deterministic"


def test_an_unknown_train_flag_name_is_an_error():
    with pytest.raises(ValueError, match="train_flag='is_training'"):
        Task(KerasStyle(), losses.softmax_cross_entropy, optax.sgd(0.1),
             train_flag="is_training")


def test_an_optimizer_constructor_not_called_is_one_clear_error():
    with pytest.raises(TypeError, match=r"adam.*optax.adam\(1e-3\).*OptimizerFactory"):
        Task(KerasStyle(), losses.softmax_cross_entropy, optax.adam)


def test_metrics_default_to_loss_and_accuracy_for_labels_and_loss_alone_otherwise():
    data = classification()
    task = Task(FlaxDropoutStyle(), losses.softmax_cross_entropy, optax.sgd(0.1))
    logs = quiet_trainer().fit(task, data, data, batch_size=16).history[-1]
    assert {"val/loss", "val/accuracy"} <= set(logs)
    regression = ArrayData(data.inputs, data.inputs[:, :2] * 2.0)
    task = Task(FlaxDropoutStyle(), losses.mean_squared_error, optax.sgd(0.1))
    logs = quiet_trainer().fit(task, regression, regression, batch_size=16).history[-1]
    assert "val/loss" in logs and "val/accuracy" not in logs


def test_the_default_accuracy_counts_correct_predictions():
    """Accuracy by hand: the fraction of rows whose argmax is the label."""
    data = classification(n=40, seed=3)
    task = Task(FlaxDropoutStyle(), losses.softmax_cross_entropy, optax.sgd(0.1))
    trainer = quiet_trainer()
    state = trainer.init_state(task, data.inputs[:1])
    logits = FlaxDropoutStyle().apply({"params": state.params}, data.inputs)
    expected = float(np.mean(np.argmax(logits, axis=1) == data.targets))
    assert trainer.evaluate(task, state, data, batch_size=16)["accuracy"] == pytest.approx(
        expected)


class OneOutput(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(1)(x)


def test_a_regression_target_without_the_output_axis_is_an_error_before_training():
    x = np.random.default_rng(0).normal(size=(32, 3)).astype(np.float32)
    task = Task(OneOutput(), losses.mean_squared_error, optax.sgd(0.1))
    trainer = quiet_trainer()
    with pytest.raises(ValueError, match=r"targets of shape \(16,\).*\(16, 1\).*y\[:, None\]"):
        trainer.fit(task, ArrayData(x, x.sum(axis=1)), batch_size=16)


def test_one_hot_labels_for_a_classification_loss_are_an_error():
    data = classification()
    one_hot = np.eye(2, dtype=np.float32)[data.targets]
    task = Task(FlaxDropoutStyle(), losses.softmax_cross_entropy, optax.sgd(0.1))
    with pytest.raises(ValueError, match="class indices"):
        quiet_trainer().fit(task, ArrayData(data.inputs, one_hot), batch_size=16)


class TwoLayers(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2, name="head")(nn.relu(nn.Dense(4, name="hidden")(x)))


def test_a_keep_backprop_pattern_that_matches_no_layer_is_an_error():
    x = jnp.ones((2, 3))
    model = bioflax.convert(TwoLayers(), "fa", keep_backprop=["head", "Dense_*"])
    with pytest.raises(ValueError, match=r"keep_backprop pattern 'Dense_\*' matches no "
                                         r"converted layer; the converted layer paths are "
                                         r"\['hidden', 'head'\]"):
        model.init(jax.random.key(0), x)
    bioflax.convert(TwoLayers(), "fa", keep_backprop="head").init(jax.random.key(0), x)


def test_a_keep_backprop_pattern_that_matches_no_nnx_layer_is_an_error():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.hidden = nnx.Linear(3, 4, rngs=rngs)
            self.head = nnx.Linear(4, 2, rngs=rngs)

        def __call__(self, x):
            return self.head(nnx.relu(self.hidden(x)))

    with pytest.raises(ValueError, match="keep_backprop pattern 'Linear_0' matches no "):
        bioflax.convert(Net(nnx.Rngs(0)), "fa", rngs=nnx.Rngs(feedback=0),
                        keep_backprop="Linear_0")


def test_alignment_finds_the_output_layer_itself():
    data = classification(n=32)
    task = Task(bioflax.convert(TwoLayers(), "fa"), losses.softmax_cross_entropy,
                optax.sgd(0.1), step_metrics=[alignment.Alignment(every=1)])
    logs = quiet_trainer(log_every_steps=2).fit(task, data, batch_size=16).history[-1]
    # Two layers, so the mean over hidden layers is the one hidden layer's angle.
    assert logs["alignment/hidden_grad_angle"] == pytest.approx(
        logs["alignment/grad_angle/hidden"])
    assert logs["alignment/grad_angle/head"] == pytest.approx(0.0, abs=1e-2)
    assert logs["alignment/grad_angle/hidden"] > 1.0
