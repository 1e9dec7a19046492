"""The trainer with models that have state and randomness: a CNN with BatchNorm and
dropout, fixed feedback matrices, resumed callbacks, 1 and 8 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from bioflax import alignment as alignment_lib
from bioflax import losses as losses_lib
from bioflax.experiment import input_pipeline as batches
from bioflax.trainer import arrays, callbacks
from bioflax.trainer import metrics as trainer_metrics
from bioflax.layers import FEEDBACK_COLLECTION, RandomDenseLinearFA
from bioflax.trainer import Callback, OptimizerFactory, Task, Trainer
from e2e import curves_on_devices


class SmallCNN(nn.Module):
    """A CNN as a Flax user writes one."""

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(4, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x)
        x = x.reshape((x.shape[0], -1))
        x = nn.Dropout(0.5, deterministic=not train)(x)
        return nn.Dense(3)(x)


def images(n=96, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(1.0, 2.0, (n, 6, 6, 1)).astype(np.float32)
    return batches.Split(x, (x[:, :3, :, 0].sum(axis=(1, 2)) > 9).astype(np.int32) +
                      (x[:, 3:, :, 0].sum(axis=(1, 2)) > 9).astype(np.int32))


def cnn_task(**kwargs):
    return Task(module=SmallCNN(), loss=losses_lib.softmax_cross_entropy,
                optimizer=optax.sgd(0.05, momentum=0.9), metrics=trainer_metrics.ClassificationMetrics,
                **kwargs)


def fit_cnn(seed=0, epochs=2, batch_size=16, task=None):
    class Record(Callback):
        losses = []

        def on_train_chunk_end(self, trainer, state, step, logs):
            self.losses.append(logs["train/loss"])

    record = Record()
    record.losses = []
    trainer = Trainer(max_epochs=epochs, log_every_steps=2, seed=seed, progress_bar=False,
                      report_progress=False, callbacks=[record])
    result = trainer.fit(task or cnn_task(), images(), batch_size=batch_size)
    return trainer, result, record.losses


def test_the_cnn_trains_as_a_plain_loop_with_the_documented_rng_streams():
    """Compiled chunks = value_and_grad steps with dropout keys
    fold_in(fold_in(fold_in(key(seed), 0), step), 0) and batch_stats carried along."""
    seed, split, module = 3, images(), SmallCNN()
    _, result, chunk_losses = fit_cnn(seed=seed)
    key = jax.random.key(seed)
    variables = module.init({"params": key, "dropout": jax.random.fold_in(key, 1),
                             "feedback": jax.random.fold_in(key, 2)},
                            split.inputs[:1], train=False)
    params, batch_stats = variables["params"], variables["batch_stats"]
    optimizer = optax.sgd(0.05, momentum=0.9)
    opt_state = optimizer.init(params)
    root, losses = jax.random.fold_in(key, 0), []
    for epoch in range(2):
        for step_in_epoch, batch in enumerate(np.split(arrays.epoch_order(seed, epoch, 96), 6)):
            step_key = jax.random.fold_in(root, epoch * 6 + step_in_epoch)

            def loss_of(p, batch=batch, step_key=step_key):
                logits, updated = module.apply(
                    {"params": p, "batch_stats": batch_stats}, split.inputs[batch], train=True,
                    rngs={"dropout": jax.random.fold_in(step_key, 0)}, mutable=["batch_stats"])
                loss = losses_lib.softmax_cross_entropy(logits, split.targets[batch]).mean()
                return loss, updated["batch_stats"]

            (loss, batch_stats), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            losses.append(float(loss))
    np.testing.assert_allclose(chunk_losses, np.mean(np.reshape(losses, (6, 2)), axis=1),
                               rtol=1e-5)
    got = {"params": result.state.params, "batch_stats": result.state.model_state["batch_stats"]}
    want = {"params": params, "batch_stats": batch_stats}
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=str(path))
    assert float(jnp.abs(batch_stats["BatchNorm_0"]["mean"]).min()) > 0.01  # they moved


def test_training_is_reproducible_and_evaluation_deterministic():
    trainer, first, losses = fit_cnn(seed=1)
    _, again, losses_again = fit_cnn(seed=1)
    _, other, losses_other = fit_cnn(seed=2)
    assert losses == losses_again and losses != losses_other
    for a, b in zip(jax.tree.leaves(first.state), jax.tree.leaves(again.state)):
        np.testing.assert_array_equal(a, b)
    task, split = cnn_task(), images(n=40, seed=5)
    assert (trainer.evaluate(task, first.state, split, batch_size=16)
            == trainer.evaluate(task, first.state, split, batch_size=16))
    # Prediction is the module in evaluation mode: running averages, no dropout.
    state = first.state
    expected = SmallCNN().apply({"params": state.params, **state.model_state}, split.inputs,
                                train=False)
    np.testing.assert_allclose(trainer.predict(task, state, split.inputs, batch_size=16),
                               expected, rtol=1e-5, atol=1e-5)


def test_the_alignment_reference_uses_the_steps_dropout_mask():
    """Backprop against backprop: angle 0 only if the reference sees the same mask."""
    _, result, _ = fit_cnn(task=cnn_task(step_metrics=[alignment_lib.Alignment(every=1)]))
    angles = {k: v for k, v in result.history[-1].items()
              if k.startswith("alignment/grad_angle/")}
    assert "alignment/grad_angle/Dense_0" in angles
    assert all(v < 1e-2 for v in angles.values()), angles


class FAWithBatchNorm(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = RandomDenseLinearFA(8)(x)
        x = nn.tanh(nn.BatchNorm(use_running_average=not train)(x))
        return RandomDenseLinearFA(3)(x)


def test_fixed_feedback_matrices_stay_bit_identical_while_batch_stats_change():
    split = images()
    task = Task(module=FAWithBatchNorm(), loss=losses_lib.softmax_cross_entropy,
                optimizer=optax.sgd(0.1), metrics=trainer_metrics.ClassificationMetrics)
    flat = batches.Split(split.inputs.reshape(96, -1), split.targets)
    trainer = Trainer(max_epochs=2, log_every_steps=3, progress_bar=False,
                      report_progress=False)
    initial = trainer.init_state(task, flat.inputs[:1])
    result = trainer.fit(task, flat, batch_size=16)
    before, after = initial.model_state, result.state.model_state
    assert jax.tree.leaves(before[FEEDBACK_COLLECTION])
    for a, b in zip(jax.tree.leaves(before[FEEDBACK_COLLECTION]),
                    jax.tree.leaves(after[FEEDBACK_COLLECTION])):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(before["batch_stats"]["BatchNorm_0"]["mean"],
                           after["batch_stats"]["BatchNorm_0"]["mean"])


def cnn_curve() -> list[float]:
    """The chunk losses of the CNN on every device of this process (a global batch of 16)."""
    return fit_cnn(seed=0, epochs=3)[2]


@pytest.mark.e2e  # a subprocess with 8 CPU devices (over 10 s)
def test_one_and_eight_devices_give_the_cnn_the_same_curve():
    """BatchNorm's statistics are over the global batch, however it is sharded."""
    curves = curves_on_devices("test_trainer_models")
    assert len(curves[1]) == 9
    np.testing.assert_allclose(curves[8], curves[1], rtol=1e-4)


# --- resume -------------------------------------------------------------------------------


class Killed(Exception):
    pass


class KillAtStep(Callback):
    """Ends fit with an exception at a chunk end, as a kill would (no final checkpoint)."""

    def __init__(self, step):
        self.step = step

    def on_train_chunk_end(self, trainer, state, step, logs):
        if step == self.step:
            raise Killed


def linear_task():
    return Task(module=nn.Dense(1), loss=losses_lib.mean_squared_error,
                optimizer=optax.sgd(0.02), metrics=trainer_metrics.RegressionMetrics)


def linear_split(n=256, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (n, 3)).astype(np.float32)
    return batches.Split(x, (x @ np.array([[1.0], [-2.0], [0.5]], np.float32) + 0.3))


# The smoothed training loss falls to this in epoch 21; a running average restarted at a
# resume after epoch 5 (the smoothed value forgotten) would reach it in epoch 20.
THRESHOLD = 0.05


def smoothed_stop_run(directory, *extra):
    stop = callbacks.EarlyStopping("train/loss", mode="min", patience=None,
                                   stopping_threshold=THRESHOLD, smoothing=0.75)
    trainer = Trainer(max_epochs=100, log_every_steps=8, progress_bar=False,
                      report_progress=False,
                      callbacks=[stop, callbacks.ModelCheckpoint(directory, every_n_steps=40),
                                 *extra])
    return trainer.fit(linear_task(), linear_split(), batch_size=32, resume=True)


def test_a_run_killed_after_its_first_checkpoint_stops_where_an_uninterrupted_one_does(
        tmp_path):
    uninterrupted = smoothed_stop_run(tmp_path / "uninterrupted")
    stopped_at = int(uninterrupted.state.step)
    assert stopped_at == 21 * 8  # epoch 21, long after the first checkpoint (step 40)
    with pytest.raises(Killed):
        smoothed_stop_run(tmp_path / "killed", KillAtStep(48))
    resumed = smoothed_stop_run(tmp_path / "killed")
    assert resumed.first_step == 40
    assert int(resumed.state.step) == stopped_at
    for a, b in zip(jax.tree.leaves(uninterrupted.state.params),
                    jax.tree.leaves(resumed.state.params)):
        np.testing.assert_array_equal(a, b)
    # A finished run stays finished: its early stop is in the checkpoint.
    assert int(smoothed_stop_run(tmp_path / "killed").state.step) == stopped_at


class ForwardsKeywords(nn.Module):
    """A wrapper whose ``__call__`` takes ``**kwargs``, as ``bioflax.convert``'s does."""

    @nn.compact
    def __call__(self, x, **kwargs):
        return nn.Dropout(0.5, deterministic=not kwargs["train"])(nn.Dense(4)(x))


def test_the_train_flag_follows_the_signature_unless_set():
    assert cnn_task().train_flag == "train"
    loss, tx, collection = losses_lib.mean_squared_error, optax.sgd(0.1), trainer_metrics.RegressionMetrics
    assert Task(ForwardsKeywords(), loss, tx, collection).train_flag is False
    task = Task(ForwardsKeywords(), loss, tx, collection, train_flag=True)
    trainer = Trainer(progress_bar=False, report_progress=False)
    x = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
    state = trainer.init_state(task, x[:1])
    expected = ForwardsKeywords().apply({"params": state.params}, x, train=False)
    np.testing.assert_allclose(trainer.predict(task, state, x, batch_size=8), expected,
                               rtol=1e-6)
    # In training, dropout is on: the loss of a step differs from the evaluation loss.
    result = trainer.fit(task, batches.Split(x, np.zeros((8, 4), np.float32)), batch_size=8,
                         state=state)
    assert result.history[-1]["train/loss"] != pytest.approx(
        float(np.mean(np.asarray(expected) ** 2)), rel=1e-3)
    with pytest.raises(ValueError, match="total_steps"):
        trainer.init_state(Task(ForwardsKeywords(), loss, OptimizerFactory(lambda steps: tx),
                                collection, train_flag=True), x[:1])
