"""Flax NNX models in the trainer: the adapter behind ``Task``, exact resume, dropout and
BatchNorm, alignment against the Linen twin, main.py with ``model.api = 'nnx'``."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import bioflax
from bioflax import alignment as alignment_lib
from bioflax import losses as losses_lib
from bioflax import nnx_zoo, zoo
from bioflax.experiment import input_pipeline as batches
from bioflax.experiment import models as experiment_models
from bioflax.experiment import validate
from bioflax.experiment.configs import default as default_config
from bioflax.experiment.errors import ConfigError
from bioflax.experiment.tensorboard_reader import read_scalars
from bioflax.trainer import Callback, Task, Trainer, callbacks
from bioflax.trainer import metrics as trainer_metrics
from bioflax.trainer.nnx_adapter import NnxAdapter
from e2e import curves_on_devices, run_main

X = np.random.default_rng(0).normal(size=(96, 12)).astype(np.float32)
LABELS = (X[:, :3].argmax(axis=1)).astype(np.int32)


class NnxMLP(nnx.Module):
    """12-16-16-3 tanh, with dropout after the first hidden layer."""

    def __init__(self, rngs: nnx.Rngs, dropout: float = 0.0):
        self.layer_0 = nnx.Linear(12, 16, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.layer_1 = nnx.Linear(16, 16, rngs=rngs)
        self.layer_2 = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        x = self.dropout(jnp.tanh(self.layer_0(x)))
        return self.layer_2(jnp.tanh(self.layer_1(x)))


class LinenMLP(nn.Module):
    """NnxMLP's Linen twin, without dropout."""

    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Dense(16, name="layer_0")(x))
        x = jnp.tanh(nn.Dense(16, name="layer_1")(x))
        return nn.Dense(3, name="layer_2")(x)


def converted_mlp(rule="fa", dropout=0.0):
    return bioflax.convert(NnxMLP(nnx.Rngs(params=0, dropout=1), dropout), rule,
                           rngs=nnx.Rngs(feedback=2), example=X[:4])


def classification_task(module, **kwargs):
    return Task(module=module, loss=losses_lib.softmax_cross_entropy,
                optimizer=optax.sgd(0.05, momentum=0.9),
                metrics=trainer_metrics.ClassificationMetrics, **kwargs)


# --- the adapter ---------------------------------------------------------------------------


def test_a_task_holds_an_nnx_model_in_an_adapter_keyed_as_its_linen_twin():
    task = classification_task(converted_mlp("fa"))
    assert isinstance(task.module, NnxAdapter) and task.train_flag == "train"
    variables = task.module.init({"params": jax.random.key(0), "dropout": jax.random.key(1),
                                  "feedback": jax.random.key(2)}, X[:1])
    linen = jax.eval_shape(lambda: bioflax.convert(LinenMLP(), "fa").init(
        jax.random.key(0), X[:1]))
    assert (jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, linen)
            == {"params": {f"layer_{i}": {"kernel": k, "bias": k[1:]} for i, k in
                           enumerate([(12, 16), (16, 16), (16, 3)])},
                "feedback": {f"layer_{i}": {"feedback_kernel": k} for i, k in
                             enumerate([(12, 16), (16, 16), (16, 3)])}})


def test_modules_of_the_wrong_api_or_kind_get_one_error_naming_the_fix():
    with pytest.raises(TypeError, match=r"not the class NnxMLP: pass NnxMLP\(\.\.\.\)"):
        classification_task(NnxMLP)
    with pytest.raises(TypeError, match=r"Linen module goes to Task\(module=\.\.\.\) as it is"):
        NnxAdapter(nn.Dense(3))
    with pytest.raises(TypeError, match="flax.linen.Module or a flax.nnx.Module, not dict"):
        classification_task({})


def test_the_task_feeds_every_stream_the_model_draws_and_the_adapter_names_a_missing_one():
    model = NnxMLP(nnx.Rngs(0), dropout=0.5)  # its dropout draws from the 'default' stream
    task = classification_task(model)
    assert task.rng_streams == ("dropout", "feedback", "default")
    adapter, variables = task.module, task.module.variables()

    def outputs(seed):
        return adapter.apply(variables, X, train=True, rngs=dict.fromkeys(
            task.rng_streams, jax.random.key(seed)))

    np.testing.assert_array_equal(outputs(0), outputs(0))
    assert not np.allclose(outputs(0), outputs(1))  # the 'default' stream is reseeded
    trainer = Trainer(max_epochs=1, progress_bar=False, report_progress=False)
    assert int(trainer.fit(task, batches.Split(X, LABELS), batch_size=32).state.step) == 3
    with pytest.raises(ValueError, match=r"streams \['default'\], which rngs does not key"):
        adapter.apply(variables, X, rngs={"dropout": jax.random.key(0)})


def test_seeds_trained_at_once_are_refused_for_an_nnx_model():
    trainer = Trainer(max_epochs=1, num_seeds=2, progress_bar=False, report_progress=False)
    with pytest.raises(ValueError, match="num_seeds=2.*NNX model brings its own"):
        trainer.init_state(classification_task(converted_mlp()), X[:1])


def test_the_trainer_leaves_the_nnx_model_it_was_given_usable():
    # The trainer donates its state's buffers: the task's variables must be copies.
    model = converted_mlp()
    before = np.asarray(model(X[:4]))
    Trainer(max_epochs=1, progress_bar=False, report_progress=False).fit(
        classification_task(model), batches.Split(X, LABELS), batch_size=32)
    np.testing.assert_array_equal(model(X[:4]), before)


# --- resume --------------------------------------------------------------------------------


class Killed(Exception):
    pass


class KillAtStep(Callback):
    def __init__(self, step):
        self.step = step

    def on_train_chunk_end(self, trainer, state, step, logs):
        if step == self.step:
            raise Killed


def fa_run(directory, *extra):
    trainer = Trainer(max_epochs=4, log_every_steps=2, progress_bar=False,
                      report_progress=False, seed=7,
                      callbacks=[callbacks.ModelCheckpoint(directory, every_n_steps=4), *extra])
    return trainer.fit(classification_task(converted_mlp("fa", dropout=0.3)),
                       batches.Split(X, LABELS), batch_size=16, resume=True)


def test_a_killed_nnx_run_resumes_to_the_parameters_of_an_uninterrupted_one(tmp_path):
    uninterrupted = fa_run(tmp_path / "uninterrupted")
    assert int(uninterrupted.state.step) == 24
    with pytest.raises(Killed):
        fa_run(tmp_path / "killed", KillAtStep(10))
    resumed = fa_run(tmp_path / "killed")
    assert resumed.first_step == 8
    for name in ("params", "model_state", "opt_state"):
        want, got = getattr(uninterrupted.state, name), getattr(resumed.state, name)
        assert jax.tree.structure(want) == jax.tree.structure(got)
        for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
            np.testing.assert_array_equal(a, b, err_msg=name)
    # FA's B is state, not a parameter: fixed.
    np.testing.assert_array_equal(resumed.state.model_state["feedback"]["layer_0"]
                                  ["feedback_kernel"],
                                  converted_mlp().module.layer_0.feedback_kernel[...])


# --- dropout and BatchNorm -----------------------------------------------------------------


class SmallCNN(nnx.Module):
    """tests/test_trainer_models.py's CNN in NNX."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.norm = nnx.BatchNorm(4, momentum=0.9, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.linear = nnx.Linear(6 * 6 * 4, 3, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.norm(self.conv(x)))
        return self.linear(self.dropout(x.reshape((x.shape[0], -1))))


def images(n=96, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(1.0, 2.0, (n, 6, 6, 1)).astype(np.float32)
    return batches.Split(x, (x[:, :3, :, 0].sum(axis=(1, 2)) > 9).astype(np.int32) +
                         (x[:, 3:, :, 0].sum(axis=(1, 2)) > 9).astype(np.int32))


def cnn_task():
    model = SmallCNN(nnx.Rngs(params=0, dropout=1))
    return classification_task(bioflax.convert(model, "kp", rngs=nnx.Rngs(feedback=2)))


def fit_cnn(seed, epochs=2):
    losses = []

    class Record(Callback):
        def on_train_chunk_end(self, trainer, state, step, logs):
            losses.append(logs["train/loss"])

    trainer = Trainer(max_epochs=epochs, log_every_steps=2, seed=seed, progress_bar=False,
                      report_progress=False, callbacks=[Record()])
    return trainer, trainer.fit(cnn_task(), images(), batch_size=16), losses


def cnn_curve() -> list[float]:
    """The chunk losses of the NNX CNN on every device of this process."""
    return fit_cnn(seed=0, epochs=3)[2]


def test_an_nnx_model_with_dropout_and_batchnorm_trains_reproducibly_and_evaluates_fixed():
    trainer, first, losses = fit_cnn(seed=1)
    _, again, losses_again = fit_cnn(seed=1)
    _, _, losses_other = fit_cnn(seed=2)  # another data order and other dropout masks
    assert losses == losses_again and losses != losses_other
    for a, b in zip(jax.tree.leaves(first.state), jax.tree.leaves(again.state)):
        np.testing.assert_array_equal(a, b)
    initial = trainer.init_state(cnn_task(), images().inputs[:1])
    assert not np.allclose(initial.model_state["batch_stats"]["norm"]["mean"],
                           first.state.model_state["batch_stats"]["norm"]["mean"])
    task, split, state = cnn_task(), images(n=40, seed=5), first.state
    assert (trainer.evaluate(task, state, split, batch_size=16)
            == trainer.evaluate(task, state, split, batch_size=16))
    # Prediction is the model in evaluation mode: running averages, no dropout.
    model = task.module.merge({"params": state.params, **state.model_state})
    model.eval()
    np.testing.assert_allclose(trainer.predict(task, state, split.inputs, batch_size=16),
                               model(split.inputs), rtol=1e-5, atol=1e-5)
    # Training mode draws its dropout mask from the step's key.
    variables = {"params": state.params, **state.model_state}

    def train_outputs(seed):
        return task.module.apply(variables, split.inputs, train=True,
                                 rngs={"dropout": jax.random.key(seed),
                                       "feedback": jax.random.key(0)}, mutable=["batch_stats"])[0]

    np.testing.assert_array_equal(train_outputs(0), train_outputs(0))
    assert not np.allclose(train_outputs(0), train_outputs(1))


@pytest.mark.e2e  # a subprocess with 8 CPU devices
def test_one_and_eight_devices_give_the_nnx_cnn_the_same_curve():
    """BatchNorm's statistics are over the global batch, however it is sharded."""
    curves = curves_on_devices("test_nnx_trainer")
    assert len(curves[1]) == 9
    np.testing.assert_allclose(curves[8], curves[1], rtol=1e-4)


# --- alignment -----------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["fa", "kp", "dfa"])
def test_alignment_of_an_nnx_model_is_that_of_its_linen_twin_with_the_same_weights(rule):
    adapter = NnxAdapter(converted_mlp(rule))
    variables = adapter.variables()
    twin = bioflax.convert(LinenMLP(), rule)
    shapes = jax.eval_shape(lambda: twin.init(jax.random.key(0), X[:1]))
    assert jax.tree.map(jnp.shape, shapes) == jax.tree.map(jnp.shape, variables)

    def metrics(apply):
        state = {k: v for k, v in variables.items() if k != "params"}

        def loss(params):
            return losses_lib.softmax_cross_entropy(apply({"params": params, **state}, X),
                                                    LABELS).mean()

        params = variables["params"]
        metric = alignment_lib.Alignment(1, output_layer="layer_2")
        return jax.jit(lambda p: metric(loss, p, state, jax.grad(loss)(p)))(params)

    nnx_metrics = metrics(lambda v, x: adapter.apply(v, x, train=True,
                                                     rngs={"dropout": jax.random.key(0)}))
    linen_metrics = metrics(twin.apply)
    assert nnx_metrics.keys() == linen_metrics.keys()
    assert {"alignment/grad_angle/layer_0", "alignment/hidden_grad_angle"} <= set(nnx_metrics)
    for name, value in linen_metrics.items():
        np.testing.assert_allclose(nnx_metrics[name], value, rtol=1e-6, atol=1e-6,
                                   err_msg=name)
    assert nnx_metrics["alignment/grad_angle/layer_0"] > 1.0  # not backprop's gradient
    model = converted_mlp(rule)
    assert (alignment_lib.layers_in_call_order(model, X[:1])
            == alignment_lib.layers_in_call_order(twin, X[:1])
            == ["layer_0", "layer_1", "layer_2"])


# --- the experiment's NNX models ----------------------------------------------------------


def linen_and_nnx(name, **fields):
    config = default_config.get_config()
    config.model.update(name=name, **fields)
    example = np.zeros((2, 32, 32, 1) if name == "lenet5" else (2, 784), np.float32)
    linen = experiment_models.build(config.model, 10)
    config.model.api = "nnx"
    return linen, experiment_models.build(config.model, 10, example, seed=0), example


@pytest.mark.parametrize("name, fields", [
    ("mlp", {"hidden_layers": (500, 500), "activations": ("relu", "relu")}),
    ("lenet5", {"rule": "fa"})])
def test_the_nnx_models_have_the_shapes_of_the_linen_ones(name, fields):
    assert set(nnx_zoo.NNX_ZOO) <= set(zoo.ZOO)
    linen, model, example = linen_and_nnx(name, **fields)
    shapes = jax.eval_shape(lambda: linen.init(jax.random.key(0), example))
    assert (jax.tree.map(jnp.shape, NnxAdapter(model).variables())
            == jax.tree.map(jnp.shape, dict(shapes)))


@pytest.mark.parametrize("fields, field, message", [
    ({"model.api": "jax"}, "model.api", r"choose one of \['linen', 'nnx'\]"),
    ({"model.api": "nnx", "model.name": "vit_mnist"}, "model.name",
     r"has no nnx version; those that have one are \['mlp', 'lenet5'\]"),
    ({"model.api": "nnx", "training.num_seeds": 2}, "training.num_seeds",
     "NNX model is built initialised from config.seed"),
])
def test_configs_that_an_nnx_model_cannot_run_are_refused(fields, field, message):
    config = default_config.get_config()
    for path, value in fields.items():
        section, name = path.split(".")
        config[section][name] = value
    if config.model.name == "vit_mnist":
        config.data.flatten = False
    with pytest.raises(ConfigError, match=f"{field} = .*{message}"):
        validate.validate(config)


@pytest.mark.e2e  # reads the whole real MNIST in a subprocess
@pytest.mark.parametrize("config", ["configs/fa_mnist.py", "configs/lenet_mnist.py"])
def test_main_trains_an_nnx_model(tmp_path, config):
    result = run_main(config, tmp_path, "--config.model.api=nnx",
                      "--config.training.fast_dev_run=3", "--config.alignment.every_steps=1")
    assert result.returncode == 0, result.stderr[-3000:]
    scalars = read_scalars(tmp_path)
    assert [step for step, _ in scalars["train/loss"]] == [3]
    layer = "layer_0" if "fa_" in config else "conv1"
    assert f"alignment/grad_angle/{layer}" in scalars and "test/accuracy" in scalars
    assert "alignment/hidden_grad_angle" in scalars
