"""The generic trainer, in process, on small synthetic data."""

import types

import jax
import numpy as np
import optax
import pytest
from flax import linen as nn

from bioflax import alignment as alignment_lib
from bioflax import losses as losses_lib
from bioflax.experiment import datasets as data
from bioflax.experiment import input_pipeline as batches
from bioflax.experiment import run as train
from bioflax.experiment.input_pipeline import TFData
from bioflax.models import BioNeuralNetwork
from bioflax.trainer import (Callback, OptimizerFactory, Task, Trainer, TrainingDivergedError,
                             arrays, callbacks)
from bioflax.trainer import console
from bioflax.trainer import metrics as trainer_metrics
from bioflax.experiment.configs import teacher as teacher_config


def linear_task(learning_rate=0.1):
    return Task(module=nn.Dense(1), loss=losses_lib.mean_squared_error,
                optimizer=optax.sgd(learning_rate), metrics=trainer_metrics.RegressionMetrics)


def linear_split(n=256, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (n, 3)).astype(np.float32)
    return batches.Split(x, (x @ np.array([[1.0], [-2.0], [0.5]], np.float32) + 0.3))


def test_fit_learns_a_linear_map_and_predict_returns_every_row():
    trainer = Trainer(max_epochs=20, log_every_steps=8, progress_bar=False)
    task = linear_task()
    result = trainer.fit(task, linear_split(), linear_split(seed=1), batch_size=32)
    history, params = result.history, result.state.params
    assert len(history) == 20 and history[-1]["epoch"] == 20
    assert history[-1]["val/loss"] < 1e-3 < history[0]["val/loss"]
    kernel = np.asarray(params["kernel"]).ravel()
    np.testing.assert_allclose(kernel, [1.0, -2.0, 0.5], atol=0.02)
    inputs = linear_split(n=7, seed=2).inputs
    expected = inputs @ np.asarray(params["kernel"]) + np.asarray(params["bias"])
    np.testing.assert_allclose(trainer.predict(task, result.state, inputs, batch_size=4),
                               expected, rtol=1e-5, atol=1e-6)


def test_evaluate_averages_over_every_example_of_a_ragged_split():
    trainer = Trainer(max_epochs=1, progress_bar=False)
    task = linear_task()
    split = linear_split(n=103)
    state = trainer.init_state(task, split.inputs[:1])
    outputs = split.inputs @ np.asarray(state.params["kernel"]) + np.asarray(
        state.params["bias"])
    expected = np.mean((outputs - split.targets) ** 2)
    result = trainer.evaluate(task, state, split, batch_size=10)
    np.testing.assert_allclose(result["loss"], expected, rtol=1e-5)


@pytest.mark.parametrize("program", ["fit", "evaluate", "predict"])
def test_every_compiled_program_gets_the_trainers_compiler_options(program):
    # XLA refuses an option it does not know when it compiles: each program passes them on.
    trainer = Trainer(max_epochs=1, progress_bar=False,
                      compiler_options={"xla_no_such_option": True})
    task, split = linear_task(), linear_split(n=64)
    state = trainer.init_state(task, split.inputs[:1])
    run = {"fit": lambda: trainer.fit(task, split, batch_size=32),
           "evaluate": lambda: trainer.evaluate(task, state, split, batch_size=32),
           "predict": lambda: trainer.predict(task, state, split.inputs, batch_size=32)}
    with pytest.raises(jax.errors.JaxRuntimeError, match="xla_no_such_option"):
        run[program]()


def test_in_memory_and_tf_data_paths_train_identically():
    losses = {}
    for in_memory in (True, False):
        trainer = Trainer(max_epochs=3, log_every_steps=5, progress_bar=False, seed=3)
        split = linear_split(n=200)
        result = trainer.fit(linear_task(), split if in_memory else TFData(split),
                             batch_size=16)
        losses[in_memory] = [h["train/loss"] for h in result.history]
        assert result.state.step == 3 * (200 // 16)
    np.testing.assert_allclose(losses[False], losses[True], rtol=1e-6)


def test_the_same_seed_gives_the_same_numbers_and_another_seed_does_not():
    def final_kernel(seed):
        trainer = Trainer(max_epochs=1, log_every_steps=4, seed=seed, progress_bar=False)
        return np.asarray(trainer.fit(linear_task(), linear_split(),
                                      batch_size=16).state.params["kernel"])

    np.testing.assert_array_equal(final_kernel(0), final_kernel(0))
    assert not np.array_equal(final_kernel(0), final_kernel(1))


def test_limit_train_batches_and_max_steps_bound_the_run():
    trainer = Trainer(max_epochs=5, log_every_steps=3, limit_train_batches=4,
                      progress_bar=False)
    assert int(trainer.fit(linear_task(), linear_split(), batch_size=16).state.step) == 20
    trainer = Trainer(max_epochs=5, max_steps=7, log_every_steps=3, progress_bar=False)
    assert int(trainer.fit(linear_task(), linear_split(), batch_size=16).state.step) == 7


def test_callbacks_see_every_chunk_and_epoch():
    class Recorder(Callback):
        def __init__(self):
            self.events = []

        def on_train_chunk_end(self, trainer, state, step, logs):
            self.events.append(("chunk", step, int(state.step)))

        def on_train_epoch_end(self, trainer, state, epoch, logs):
            self.events.append(("epoch", epoch))

    recorder = Recorder()
    Trainer(max_epochs=2, log_every_steps=3, callbacks=[recorder],
            progress_bar=False).fit(linear_task(), linear_split(n=80), batch_size=16)
    assert recorder.events == [("chunk", 3, 3), ("chunk", 5, 5), ("epoch", 0),
                               ("chunk", 8, 8), ("chunk", 10, 10), ("epoch", 1)]


def test_early_stopping_stops_when_the_monitored_metric_stalls():
    trainer = Trainer(max_epochs=50, log_every_steps=8, progress_bar=False,
                      callbacks=[callbacks.EarlyStopping("val/loss", patience=2,
                                                         min_delta=1.0)])
    history = trainer.fit(linear_task(), linear_split(), linear_split(seed=1),
                          batch_size=32).history
    assert len(history) == 3  # epoch 1 sets the best; 2 and 3 do not beat it by 1.0


def test_a_diverging_loss_stops_training_at_its_step():
    trainer = Trainer(max_epochs=5, log_every_steps=10, progress_bar=False)
    with pytest.raises(TrainingDivergedError, match=r"diverged at step \d+.*learning rate"):
        trainer.fit(linear_task(learning_rate=1e6), linear_split(), batch_size=16)


def test_alignment_of_backprop_runs_in_fit_and_reports_every_layer():
    """A smoke test of the alignment metrics inside ``fit``: under backprop the rule's
    gradient and the reference are the same function traced twice, so angle 0 and cosine 1
    for every layer (tests/test_metrics.py checks the values against NumPy)."""
    task = Task(module=nn.Sequential([nn.Dense(8), nn.tanh, nn.Dense(1)]),
                loss=losses_lib.mean_squared_error, optimizer=optax.sgd(0.05),
                metrics=trainer_metrics.RegressionMetrics, step_metrics=[alignment_lib.Alignment(every=2)])
    trainer = Trainer(max_epochs=1, log_every_steps=8, progress_bar=False)
    history = trainer.fit(task, linear_split(), batch_size=32).history
    angles = {k: v for k, v in history[-1].items() if k.startswith("alignment/grad_angle")}
    assert set(angles) == {"alignment/grad_angle/layers_0", "alignment/grad_angle/layers_2",
                           "alignment/grad_angle/all"}
    # Two compiled passes of the same gradient differ by rounding at most.
    assert all(v < 1e-3 for v in angles.values()), angles
    assert history[-1]["alignment/grad_cosine/all"] == pytest.approx(1.0, abs=1e-6)
    assert history[-1]["alignment/relative_grad_norm"] == pytest.approx(1.0, abs=1e-6)


def test_train_and_evaluate_fast_dev_run_writes_no_checkpoint(tmp_path):
    config = teacher_config.get_config()
    config.training.fast_dev_run = 3
    result = train.train_and_evaluate(config, str(tmp_path))
    assert int(result["state"].step) == 3
    assert not (tmp_path / "checkpoints").exists()
    assert np.isfinite(result["test"]["test/loss"])


def test_seeds_trained_at_once_match_separate_runs():
    """Three seeds vmapped in one program = three runs with seeds 5, 6, 7."""
    def task():
        return Task(module=BioNeuralNetwork((8,), ("tanh",), 1, "kp"),
                    loss=losses_lib.mean_squared_error, optimizer=optax.sgd(0.05),
                    metrics=trainer_metrics.RegressionMetrics, step_metrics=[alignment_lib.Alignment(4)])

    split, val = linear_split(n=160), linear_split(n=50, seed=1)
    together = Trainer(max_epochs=2, log_every_steps=4, seed=5, num_seeds=3,
                       progress_bar=False)
    fitted = together.fit(task(), split, val, batch_size=16)
    history = fitted.history
    for index in range(3):
        alone = Trainer(max_epochs=2, log_every_steps=4, seed=5 + index, progress_bar=False)
        alone_fit = alone.fit(task(), split, val, batch_size=16)
        alone_history = alone_fit.history
        for name in ("train/loss", "val/loss", "alignment/grad_angle/layer_0"):
            np.testing.assert_allclose(history[-1][f"seed_{index}/{name}"],
                                       alone_history[-1][name], rtol=1e-4, err_msg=name)
        for name, value in alone_fit.state.params["layer_0"].items():
            np.testing.assert_allclose(fitted.state.params["layer_0"][name][index], value,
                                       rtol=1e-4, atol=1e-6, err_msg=name)
    losses = [history[-1][f"seed_{i}/train/loss"] for i in range(3)]
    assert history[-1]["train/loss"] == pytest.approx(np.mean(losses))
    assert len(set(losses)) == 3
    predictions = together.predict(task(), fitted.state, val.inputs)
    assert predictions.shape == (3, 50, 1)


def test_early_stopping_stops_at_once_when_the_metric_reaches_its_threshold():
    stop = callbacks.EarlyStopping("train/loss", mode="min", patience=None,
                                   stopping_threshold=0.05)
    history = Trainer(max_epochs=50, log_every_steps=8, progress_bar=False,
                      callbacks=[stop]).fit(linear_task(), linear_split(), batch_size=32).history
    losses = [logs["train/loss"] for logs in history]
    assert len(history) < 50 and losses[-1] <= 0.05
    assert all(loss > 0.05 for loss in losses[:-1])


def test_smoothed_stopping_waits_for_the_running_average_to_reach_the_threshold():
    """Accuracies 0.9, 1, 1, …: the average is 1 − 0.1·0.75ᵏ after k perfect epochs, which
    reaches 0.9999 first at k = 25 (0.75²⁴ = 1.003e-3 > 1e-3 ≥ 0.75²⁵), epoch 26."""
    stop = callbacks.EarlyStopping("train/accuracy", mode="max", patience=None,
                                   stopping_threshold=0.9999, smoothing=0.75)
    trainer = types.SimpleNamespace(should_stop=False)
    epochs = 0
    while not trainer.should_stop:
        stop.on_train_epoch_end(trainer, None, epochs, {"train/accuracy": 0.9 if epochs == 0 else 1.0})
        epochs += 1
        assert epochs <= 100
    assert epochs == 26
    unsmoothed = callbacks.EarlyStopping("train/accuracy", mode="max", patience=None,
                                         stopping_threshold=0.9999)
    unsmoothed.on_train_epoch_end(trainer, None, 0, {"train/accuracy": 1.0})
    assert trainer.should_stop
    with pytest.raises(ValueError, match="smoothing"):
        callbacks.EarlyStopping(smoothing=1.0)


@pytest.mark.parametrize("mode", ["bp", "fa", "kp", "dfa"])
def test_compiled_chunks_give_the_loss_curve_of_a_plain_step_by_step_loop(mode):
    """The fast path (scanned chunks, donated state, on-device batches, alignment on some
    steps) trains exactly as a plain Python loop of value_and_grad and optax updates."""
    import jax  # pylint: disable=import-outside-toplevel
    rng = np.random.default_rng(0)
    inputs = rng.normal(size=(200, 12)).astype(np.float32)
    targets = (inputs[:, :3].argmax(axis=1)).astype(np.int32)
    module = BioNeuralNetwork(hidden_layers=(16, 16), activations=("tanh", "tanh"),
                              features=3, rule=mode)
    optimizer = optax.chain(optax.add_decayed_weights(1e-3), optax.sgd(0.1, momentum=0.9))
    task = Task(module=module, loss=losses_lib.softmax_cross_entropy, optimizer=optimizer,
                metrics=trainer_metrics.ClassificationMetrics, step_metrics=[alignment_lib.Alignment(3)])
    chunk_losses = []

    class Record(Callback):
        def on_train_chunk_end(self, trainer, state, step, logs):
            chunk_losses.append(logs["train/loss"])

    trainer = Trainer(max_epochs=2, log_every_steps=5, seed=4, callbacks=[Record()],
                      progress_bar=False)
    result = trainer.fit(task, batches.Split(inputs, targets), batch_size=20)

    variables = module.init(jax.random.key(4), inputs[:1])
    params = variables.pop("params")
    opt_state = optimizer.init(params)
    losses = []
    for epoch in range(2):
        order = arrays.epoch_order(4, epoch, len(inputs))
        for batch in np.split(order, 10):
            def loss_of(p, batch=batch):
                logits = module.apply({"params": p, **variables}, inputs[batch])
                return losses_lib.softmax_cross_entropy(logits, targets[batch]).mean()
            loss, grads = jax.value_and_grad(loss_of)(params)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            losses.append(float(loss))
    np.testing.assert_allclose(chunk_losses, np.mean(np.reshape(losses, (4, 5)), axis=1),
                               rtol=2e-5)
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(result.state.params),
                                 jax.tree_util.tree_leaves(params)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=str(path))


def test_an_optimizer_factory_gets_the_runs_total_step_count():
    seen = []

    def optimizer(total_steps):
        seen.append(total_steps)
        return optax.sgd(optax.linear_schedule(0.1, 0.0, total_steps))

    task = Task(module=nn.Dense(1), loss=losses_lib.mean_squared_error,
                optimizer=OptimizerFactory(optimizer), metrics=trainer_metrics.RegressionMetrics)
    Trainer(max_epochs=3, log_every_steps=4, progress_bar=False, report_progress=False).fit(
        task, linear_split(n=200), batch_size=16)
    assert seen == [3 * (200 // 16)]


def test_the_console_prints_one_line_per_epoch(capsys):
    Trainer(max_epochs=3, log_every_steps=2, progress_bar=False, report_progress=False).fit(
        linear_task(), linear_split(n=64), linear_split(n=32, seed=1), batch_size=16)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch")]
    assert len(lines) == 3
    assert lines[0].startswith("epoch 1/3  train/loss ")
    assert " val/loss " in lines[0]


def test_the_epoch_line_shows_the_hidden_layers_angle_and_the_epochs_max_steps_reach():
    line = console.epoch_line(1, 3, {"train/loss": 0.5, "val/accuracy": 0.25,
                                     "alignment/hidden_grad_angle": 41.25, "epoch": 2})
    assert line == "epoch 2/3  train/loss 0.5  val/accuracy 0.25  hidden angle 41.2°"


def test_nothing_is_printed_without_the_console(capsys):
    Trainer(max_epochs=2, log_every_steps=2, console=False, report_progress=False).fit(
        linear_task(), linear_split(n=64), batch_size=16)
    assert capsys.readouterr().out == ""


def test_intervals_in_epochs_follow_the_batch_size_and_the_validation_split():
    from bioflax.experiment.configs.paper import nokland2016  # pylint: disable=import-outside-toplevel
    config = nokland2016.get_config("2x800_dfa")
    config.data.batch_size = 128
    every = train.intervals(config, train.durations(config, 60_000))
    assert (every["log"], every["alignment"]) == (468, 468)
    config.data.val_split = 0.1  # 54_000 training images, 421 batches of 128
    every = train.intervals(config, train.durations(config, 54_000))
    assert every["log"] == 421
    config = teacher_config.get_config()  # intervals in steps stay as they are
    every = train.intervals(config, train.durations(config, 10_000))
    assert every == {"log": config.training.log_every_steps, "alignment": 20}
