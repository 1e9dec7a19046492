"""Traps of the Trainer's Python API: data given as (inputs, targets) tuples, run lengths in
steps, and an EarlyStopping monitor the run will never log."""

import numpy as np
import optax
import pytest
from flax import linen as nn

from bioflax import alignment as alignment_lib
from bioflax import losses as losses_lib
from bioflax.trainer import (ArrayData, Callback, ClassificationMetrics, EarlyStopping,
                             ModelCheckpoint, RegressionMetrics, Task, Trainer,
                             resolve_durations)
from bioflax.trainer.arrays import as_data
from bioflax.trainer.loop import LogNames


def linear_task():
    return Task(module=nn.Dense(1), loss=losses_lib.mean_squared_error,
                optimizer=optax.sgd(0.1), metrics=RegressionMetrics)


def classifier_task(step_metrics=()):
    return Task(module=nn.Sequential([nn.Dense(4), nn.tanh, nn.Dense(3)]),
                loss=losses_lib.softmax_cross_entropy,
                optimizer=optax.sgd(0.1), metrics=ClassificationMetrics,
                step_metrics=step_metrics)


def linear_arrays(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (n, 3)).astype(np.float32)
    return x, x @ np.array([[1.0], [-2.0], [0.5]], np.float32) + 0.3


def class_arrays(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    return x, x.argmax(axis=1).astype(np.int32)


def quiet(**kwargs):
    return Trainer(progress_bar=False, report_progress=False, **kwargs)


class Recorder(Callback):
    def __init__(self):
        self.chunks, self.epochs = [], []

    def on_train_chunk_end(self, trainer, state, step, logs):
        self.chunks.append(step)

    def on_train_epoch_end(self, trainer, state, epoch, logs):
        self.epochs.append((epoch, int(state.step), dict(logs)))


# --- (inputs, targets) tuples ------------------------------------------------------------

def test_fit_and_evaluate_take_inputs_targets_tuples_as_array_data():
    train, val = linear_arrays(), linear_arrays(n=40, seed=1)
    from_tuples = quiet(max_epochs=2, log_every_steps=2).fit(
        linear_task(), train, val=val, batch_size=16)
    from_data = quiet(max_epochs=2, log_every_steps=2).fit(
        linear_task(), ArrayData(*train), val=ArrayData(*val), batch_size=16)
    assert int(from_tuples.state.step) == 2 * (64 // 16)
    assert [h["epoch"] for h in from_tuples.history] == [1, 2]
    for got, want in zip(from_tuples.history, from_data.history):
        assert got == pytest.approx(want)
    trainer = quiet()
    evaluated = trainer.evaluate(linear_task(), from_tuples.state, val, batch_size=16)
    assert evaluated == pytest.approx(
        trainer.evaluate(linear_task(), from_tuples.state, ArrayData(*val), batch_size=16))
    assert evaluated["loss"] == pytest.approx(from_tuples.history[-1]["val/loss"])


def test_a_float64_tuple_trains_as_float32():
    x, y = linear_arrays()
    result = quiet(log_every_steps=4).fit(linear_task(), (x.astype(np.float64),
                                                          y.astype(np.float64)),
                                          val=(x.astype(np.float64), y), batch_size=16)
    assert np.isfinite(result.history[-1]["val/loss"])
    assert as_data((x.astype(np.float64), y)).inputs.dtype == np.float32


@pytest.mark.parametrize("bad, got", [
    (lambda x, y: [x, y], "got a list of 2"),
    (lambda x, y: (x, y, y), "got a tuple of 3"),
    (lambda x, y: {"input": x, "target": y}, "got a dict"),
    (lambda x, y: (1.0, 2.0), "not both arrays"),
])
def test_other_data_is_a_value_error_naming_what_is_accepted(bad, got):
    x, y = linear_arrays(n=32)
    trainer = quiet()
    with pytest.raises(ValueError, match=rf"train must be a DataSource .*ArrayData.*"
                                         rf"\(inputs, targets\) tuple.*{got}"):
        trainer.fit(linear_task(), bad(x, y), batch_size=16)
    with pytest.raises(ValueError, match=rf"val must be an ArrayData, .*tuple.*{got}"):
        trainer.fit(linear_task(), (x, y), val=bad(x, y), batch_size=16)
    state = trainer.init_state(linear_task(), x[:1])
    with pytest.raises(ValueError, match=rf"data must be an ArrayData, .*tuple.*{got}"):
        trainer.evaluate(linear_task(), state, bad(x, y), batch_size=16)


# --- run lengths ---------------------------------------------------------------------------

def test_resolve_trains_max_steps_across_epochs_and_one_epoch_by_default():
    assert resolve_durations(64, 16).total_steps == 4  # neither: one epoch
    assert resolve_durations(64, 16, max_steps=10).total_steps == 10
    assert resolve_durations(64, 16, max_epochs=2, max_steps=10).total_steps == 8
    assert resolve_durations(64, 16, max_epochs=3, max_steps=10).total_steps == 10
    assert resolve_durations(64, 16, max_epochs=3).total_steps == 12
    durations = resolve_durations(64, 16, max_steps=10)
    assert durations.epochs == 3
    assert [s for s in range(1, 11) if durations.ends_epoch(s)] == [4, 8, 10]


def test_max_steps_alone_trains_that_many_steps_and_logs_the_partial_last_epoch():
    recorder = Recorder()
    result = quiet(max_steps=10, log_every_steps=3, callbacks=[recorder]).fit(
        linear_task(), linear_arrays(), val=linear_arrays(n=32, seed=1), batch_size=16)
    assert int(result.state.step) == 10  # 4 steps per epoch
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert all("val/loss" in h for h in result.history)
    assert [(epoch, step) for epoch, step, _ in recorder.epochs] == [(0, 4), (1, 8), (2, 10)]
    assert recorder.chunks == [3, 4, 7, 8, 10]
    assert recorder.epochs[-1][2] == result.history[-1]


def test_neither_bound_trains_one_epoch_and_both_end_at_the_first():
    assert int(quiet(log_every_steps=3).fit(linear_task(), linear_arrays(),
                                            batch_size=16).state.step) == 4
    assert int(quiet(max_epochs=2, max_steps=100, log_every_steps=3).fit(
        linear_task(), linear_arrays(), batch_size=16).state.step) == 8


@pytest.mark.parametrize("kwargs", [{"max_epochs": 0}, {"max_steps": -1},
                                    {"max_steps": 2.5}])
def test_a_run_length_that_is_not_a_positive_integer_is_refused(kwargs):
    with pytest.raises(ValueError, match=f"{next(iter(kwargs))} must be a positive integer"):
        Trainer(**kwargs)


def test_a_run_stopped_by_max_steps_resumes_to_the_uninterrupted_runs_parameters(tmp_path):
    data = linear_arrays()
    whole = quiet(max_steps=10, log_every_steps=3).fit(linear_task(), data, batch_size=16)
    directory = str(tmp_path / "ckpt")
    first = quiet(max_steps=6, log_every_steps=3,
                  callbacks=[ModelCheckpoint(directory, every_n_steps=100)]).fit(
        linear_task(), data, batch_size=16, resume=True)
    assert int(first.state.step) == 6 and [h["epoch"] for h in first.history] == [1, 2]
    again = quiet(max_steps=6, log_every_steps=3,
                  callbacks=[ModelCheckpoint(directory, every_n_steps=100)]).fit(
        linear_task(), data, batch_size=16, resume=True)
    assert int(again.state.step) == 6 and again.history == [] and again.first_step == 6
    rest = quiet(max_steps=10, log_every_steps=3,
                 callbacks=[ModelCheckpoint(directory, every_n_steps=100)]).fit(
        linear_task(), data, batch_size=16, resume=True)
    assert rest.first_step == 6 and int(rest.state.step) == 10
    for name in ("kernel", "bias"):
        np.testing.assert_allclose(rest.state.params[name], whole.state.params[name],
                                   rtol=1e-6, err_msg=name)


@pytest.mark.parametrize("interval, saved", [
    ({}, [4, 8, 12]),                          # Lightning's default: every epoch
    ({"every_n_epochs": 2}, [8, 12]),          # and the end of fit
    ({"every_n_epochs": 0.5}, [2, 4, 6, 8, 10, 12]),
    ({"every_n_steps": 3}, [3, 6, 9, 12]),
])
def test_model_checkpoint_intervals_in_steps_or_epochs(tmp_path, interval, saved):
    """64 examples in batches of 16: 4 steps an epoch, 12 in 3 epochs."""
    checkpoint = ModelCheckpoint(str(tmp_path), max_to_keep=10, **interval)
    quiet(max_epochs=3, log_every_steps=1, callbacks=[checkpoint]).fit(
        linear_task(), linear_arrays(), batch_size=16)
    assert sorted(checkpoint.manager.all_steps()) == saved


@pytest.mark.parametrize("kwargs, message", [
    ({"every_n_steps": 5, "every_n_epochs": 1}, "not both"),
    ({"every_n_epochs": 0}, "every_n_epochs > 0"),
    ({"every_n_steps": -1}, "every_n_steps > 0"),
    ({"max_to_keep": 0}, "max_to_keep > 0"),
])
def test_model_checkpoint_refuses_a_bad_interval(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelCheckpoint(str(tmp_path), **kwargs)


def test_a_given_state_continues_for_max_steps_in_all():
    data = linear_arrays()
    trainer = quiet(max_steps=6, log_every_steps=3)
    first = trainer.fit(linear_task(), data, batch_size=16)
    more = quiet(max_steps=9, log_every_steps=3).fit(linear_task(), data, batch_size=16,
                                                     state=first.state)
    assert more.first_step == 6 and int(more.state.step) == 9
    assert [h["epoch"] for h in more.history] == [2, 3]  # steps 7-8 end epoch 2


# --- EarlyStopping's monitor ---------------------------------------------------------------

def fit_with_monitor(monitor, *, val=True, task=None):
    recorder = Recorder()
    trainer = quiet(max_epochs=2, log_every_steps=2,
                    callbacks=[recorder, EarlyStopping(monitor, patience=5)])
    result = trainer.fit(task or classifier_task(), class_arrays(),
                         val=class_arrays(n=32, seed=1) if val else None, batch_size=16)
    return result, recorder


def test_a_misspelt_monitor_is_refused_before_the_first_step():
    with pytest.raises(ValueError, match=r"'val/acc'.*'val/accuracy'.*monitor one of") as info:
        fit_with_monitor("val/acc")
    assert "'train/loss'" in str(info.value)
    with pytest.raises(ValueError, match=r"'accuracy'.*will not hold"):
        fit_with_monitor("accuracy")


def test_a_val_monitor_without_val_data_says_to_pass_it():
    recorder = Recorder()
    trainer = quiet(max_epochs=2, log_every_steps=2,
                    callbacks=[recorder, EarlyStopping("val/loss")])
    with pytest.raises(ValueError, match=r"'val/loss'.*no validation data.*pass val= data"):
        trainer.fit(classifier_task(), class_arrays(), batch_size=16)
    assert recorder.chunks == []  # refused before any training step


@pytest.mark.parametrize("monitor", ["val/loss", "val/accuracy", "train/accuracy",
                                     "train/loss"])
def test_the_metrics_the_run_logs_are_accepted(monitor):
    result, _ = fit_with_monitor(monitor)
    assert monitor in result.history[-1]
    assert len(result.history) == 2


def test_step_metric_names_are_accepted_only_when_the_task_has_step_metrics():
    monitor = "alignment/grad_angle/all"
    with pytest.raises(ValueError, match="will not hold"):
        fit_with_monitor(monitor)
    task = classifier_task(step_metrics=[alignment_lib.Alignment(every=1)])
    result, _ = fit_with_monitor(monitor, val=False, task=task)
    assert monitor in result.history[-1]


def test_log_names_with_several_seeds_and_unknown_metrics():
    names = LogNames(("loss",), has_val=True, num_seeds=2)
    assert names.missing("seed_1/val/loss") is None
    assert names.missing("seed_2/val/loss") is not None  # seeds 0 and 1 only
    assert names.missing("seed_0/epoch") is not None
    assert "seed_0/... to seed_1/..." in names.missing("val/accuracy")
    unknown = LogNames(None, has_val=False)
    assert unknown.missing("train/anything") is None
    assert "pass val= data" in unknown.missing("val/loss")


def test_the_monitor_is_checked_against_the_default_metrics_of_the_targets():
    """A task without ``metrics`` logs accuracy for integer labels only."""
    regression = Task(module=nn.Dense(1), loss=losses_lib.mean_squared_error,
                      optimizer=optax.sgd(0.1))
    with pytest.raises(ValueError, match=r"'val/accuracy'.*will not hold.*'val/loss'"):
        quiet(callbacks=[EarlyStopping("val/accuracy")]).fit(
            regression, linear_arrays(), val=linear_arrays(n=32, seed=1), batch_size=16)
    classifier = Task(module=nn.Dense(3), loss=losses_lib.softmax_cross_entropy,
                      optimizer=optax.sgd(0.1))
    result = quiet(log_every_steps=4, callbacks=[EarlyStopping("val/accuracy")]).fit(
        classifier, class_arrays(), val=class_arrays(n=32, seed=1), batch_size=16)
    assert "val/accuracy" in result.history[-1]
