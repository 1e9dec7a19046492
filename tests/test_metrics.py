"""The alignment metrics, checked against NumPy and against the laws they should show.

* On a small network every value of :class:`alignment_lib.Alignment` agrees with cosines and
  angles computed in NumPy from gradients derived by hand (tests/numpy_reference.py: the
  forward and backward pass of an MLP under each rule, in float64).
* :func:`alignment_lib.cosine` / :func:`alignment_lib.angle_degrees` give the closed-form values, and a
  backprop network measured against itself gives angle 0 and cosine 1.
* FA on a linear teacher (Lillicrap et al. 2016): the hidden layer's gradient angle to
  backprop starts near 90° and falls well below it while the network learns.
* KP with weight decay (Kolen & Pollack 1994): ``cos(W, B)`` rises from ~0 towards 1 and
  ``‖W_t − B_t‖ = (1 − lr·wd)^t ‖W_0 − B_0‖`` exactly (plain SGD).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bioflax import alignment as alignment_lib
from bioflax import layers, models
from bioflax import losses as losses_lib
from bioflax.experiment import input_pipeline as batches
from bioflax.trainer import Callback, Task, Trainer
from bioflax.trainer import metrics as trainer_metrics
from numpy_reference import np_angle, np_cosine, np_gradients

def _flat(grads):
    return np.concatenate([np.concatenate([dw.ravel(), db.ravel()]) for dw, db in grads])


HIDDEN = (6, 5)
ACTIVATIONS = ("tanh", "sigmoid")
OUTPUTS = 3


def small_problem(mode, interpolation_factor=0.5, seed=0):
    """A 3-layer BioNeuralNetwork, its variables, and a batch of 16 regression examples."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(16, 4)).astype(np.float32)
    t = rng.normal(size=(16, OUTPUTS)).astype(np.float32)
    model = models.BioNeuralNetwork(hidden_layers=HIDDEN, activations=ACTIVATIONS,
                                    features=OUTPUTS, rule=mode,
                                    interpolation_factor=interpolation_factor)
    variables = dict(model.init(jax.random.key(seed), jnp.asarray(x)))
    params = variables.pop("params")
    return model, params, variables, x, t


def _weights_and_feedback(mode, params, model_state):
    names = [f"layer_{i}" for i in range(len(HIDDEN) + 1)]
    weights = [(np.asarray(params[n]["kernel"], np.float64),
                np.asarray(params[n]["bias"], np.float64)) for n in names]
    if mode == "kp":
        feedback = [np.asarray(params[n][layers.FEEDBACK_KERNEL], np.float64) for n in names]
    elif mode in ("fa", "interpolate_fa_bp", "dfa"):
        fixed = model_state[layers.FEEDBACK_COLLECTION]
        feedback = [np.asarray(fixed[n][layers.FEEDBACK_KERNEL], np.float64) if n in fixed
                    else None for n in names]
    else:
        feedback = [None] * len(names)
    return names, weights, feedback


def _run_alignment(model, params, model_state, x, t, grads, output_layer=None):
    def loss_of_params(p):
        outputs = model.apply({"params": p, **model_state}, jnp.asarray(x))
        return losses_lib.mean_squared_error(outputs, jnp.asarray(t)).mean()

    # As the trainer does: inside a compiled function.
    alignment = alignment_lib.Alignment(every=1, output_layer=output_layer)
    values = jax.jit(lambda p, s, g: alignment(loss_of_params, p, s, g))(
        params, model_state, grads)
    return {k: float(v) for k, v in values.items()}, loss_of_params


@pytest.mark.parametrize("mode, rule, lam", [("fa", "fa", None), ("kp", "kp", None),
                                             ("interpolate_fa_bp", "interp", 0.5),
                                             ("interpolate_fa_bp", "interp", 0.8)])
def test_alignment_matches_a_numpy_computation(mode, rule, lam):
    model, params, model_state, x, t = small_problem(mode, interpolation_factor=lam or 0.5)
    names, weights, feedback = _weights_and_feedback(mode, params, model_state)
    rule_grads = np_gradients(weights, feedback, x, t, ACTIVATIONS, rule, lam)
    bp_grads = np_gradients(weights, feedback, x, t, ACTIVATIONS, "bp")

    # Sanity of the NumPy reference: the rule's gradients are what jax.grad of the model gives.
    def loss_of_params(p):
        outputs = model.apply({"params": p, **model_state}, jnp.asarray(x))
        return losses_lib.mean_squared_error(outputs, jnp.asarray(t)).mean()

    jax_grads = jax.grad(loss_of_params)(params)
    for name, (dw, db) in zip(names, rule_grads):
        np.testing.assert_allclose(jax_grads[name]["kernel"], dw, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(jax_grads[name]["bias"], db, rtol=1e-4, atol=1e-7)
    # The hidden layers' rule gradients really differ from backprop's (else this tests little).
    assert np_angle(_flat(rule_grads[:1]), _flat(bp_grads[:1])) > 1.0

    # Pass the rule's gradients computed here. For KP add a wild B-gradient: only (dW, db)
    # may enter the gradient alignment.
    grads = {}
    rng = np.random.default_rng(1)
    for name, (dw, db) in zip(names, rule_grads):
        grads[name] = {"kernel": jnp.asarray(dw, jnp.float32),
                       "bias": jnp.asarray(db, jnp.float32)}
        if mode == "kp":
            grads[name][layers.FEEDBACK_KERNEL] = jnp.asarray(
                100 * rng.normal(size=dw.shape), jnp.float32)
    assert alignment_lib.layers_in_call_order(model, jnp.asarray(x)) == names
    values, _ = _run_alignment(model, params, model_state, x, t, grads, output_layer=names[-1])

    expected = {}
    for name, rule_g, bp_g in zip(names, rule_grads, bp_grads):
        expected[f"alignment/grad_cosine/{name}"] = np_cosine(_flat([rule_g]), _flat([bp_g]))
        expected[f"alignment/grad_angle/{name}"] = np_angle(_flat([rule_g]), _flat([bp_g]))
    expected["alignment/grad_cosine/all"] = np_cosine(_flat(rule_grads), _flat(bp_grads))
    expected["alignment/grad_angle/all"] = np_angle(_flat(rule_grads), _flat(bp_grads))
    expected["alignment/relative_grad_norm"] = float(
        np.linalg.norm(_flat(bp_grads)) / np.linalg.norm(_flat(rule_grads)))
    expected["alignment/hidden_grad_angle"] = float(np.mean(
        [np_angle(_flat([r]), _flat([b])) for r, b in zip(rule_grads[:-1], bp_grads[:-1])]))
    for name, (w, _), b in zip(names, weights, feedback):
        expected[f"alignment/weight_cosine/{name}"] = np_cosine(w, b)
        expected[f"alignment/weight_difference_norm/{name}"] = float(np.linalg.norm(w - b))

    assert set(values) == set(expected)
    for key, value in expected.items():
        if "grad_angle" in key:  # also the hidden layers' mean angle
            assert values[key] == pytest.approx(value, abs=2e-3), key
        else:
            assert values[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    # The output layer of FA/KP/interpolation is trained by the true error.
    assert values[f"alignment/grad_angle/{names[-1]}"] < 1e-2
    # Sanity: the rules' hidden layers are not aligned with BP at init to this precision.
    assert values["alignment/grad_angle/layer_0"] > 1.0


def test_alignment_of_dfa_matches_numpy_and_has_no_weight_alignment():
    model, params, model_state, x, t = small_problem("dfa")
    names, weights, feedback = _weights_and_feedback("dfa", params, model_state)
    assert feedback[0].shape == (HIDDEN[0], OUTPUTS) and feedback[-1] is None
    rule_grads = np_gradients(weights, feedback, x, t, ACTIVATIONS, "dfa")
    bp_grads = np_gradients(weights, feedback, x, t, ACTIVATIONS, "bp")
    grads = {name: {"kernel": jnp.asarray(dw, jnp.float32), "bias": jnp.asarray(db, jnp.float32)}
             for name, (dw, db) in zip(names, rule_grads)}
    values, loss_of_params = _run_alignment(model, params, model_state, x, t, grads)

    jax_grads = jax.grad(loss_of_params)(params)
    for name, (dw, db) in zip(names, rule_grads):
        np.testing.assert_allclose(jax_grads[name]["kernel"], dw, rtol=1e-4, atol=1e-7)

    assert set(values) == (
        {f"alignment/grad_{kind}/{n}" for kind in ("cosine", "angle") for n in names}
        | {"alignment/grad_cosine/all", "alignment/grad_angle/all",
           "alignment/relative_grad_norm"})
    assert not any("weight_" in k for k in values)
    for name, rule_g, bp_g in zip(names, rule_grads, bp_grads):
        assert values[f"alignment/grad_cosine/{name}"] == pytest.approx(
            np_cosine(_flat([rule_g]), _flat([bp_g])), rel=1e-5, abs=1e-6)
        assert values[f"alignment/grad_angle/{name}"] == pytest.approx(
            np_angle(_flat([rule_g]), _flat([bp_g])), abs=2e-3)
    assert values["alignment/grad_cosine/all"] == pytest.approx(
        np_cosine(_flat(rule_grads), _flat(bp_grads)), rel=1e-5)
    assert values["alignment/relative_grad_norm"] == pytest.approx(
        np.linalg.norm(_flat(bp_grads)) / np.linalg.norm(_flat(rule_grads)), rel=1e-5)


# --- closed-form values --------------------------------------------------------------------


def test_cosine_and_angle_closed_form_values():
    rng = np.random.default_rng(0)
    for shape in [(7,), (5, 3), (2, 3, 4)]:
        a = rng.normal(size=shape).astype(np.float32)
        b = rng.normal(size=shape).astype(np.float32)
        assert float(alignment_lib.angle_degrees(a, a)) == pytest.approx(0.0, abs=1e-4)
        assert float(alignment_lib.cosine(a, a)) == pytest.approx(1.0, abs=1e-6)
        assert float(alignment_lib.angle_degrees(a, 3.5 * a)) == pytest.approx(0.0, abs=1e-3)
        assert float(alignment_lib.cosine(a, 3.5 * a)) == pytest.approx(1.0, abs=1e-6)
        assert float(alignment_lib.angle_degrees(a, -a)) == pytest.approx(180.0, abs=1e-4)
        assert float(alignment_lib.cosine(a, -a)) == pytest.approx(-1.0, abs=1e-6)
        # Orthogonal: b minus its projection on a (Gram-Schmidt in float64).
        a64, b64 = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
        ortho = (b64 - (a64 @ b64) / (a64 @ a64) * a64).reshape(shape).astype(np.float32)
        assert float(alignment_lib.angle_degrees(a, ortho)) == pytest.approx(90.0, abs=1e-3)
        assert float(alignment_lib.cosine(a, ortho)) == pytest.approx(0.0, abs=1e-6)
        # A generic pair agrees with arccos of the NumPy cosine.
        cos = np_cosine(a64, b64)
        assert float(alignment_lib.cosine(a, b)) == pytest.approx(cos, abs=1e-6)
        assert float(alignment_lib.angle_degrees(a, b)) == pytest.approx(
            np.degrees(np.arccos(cos)), abs=1e-3)
    # 45° and 60° in the plane.
    assert float(alignment_lib.angle_degrees(np.array([1.0, 0.0]), np.array([1.0, 1.0]))) == \
        pytest.approx(45.0, abs=1e-4)
    assert float(alignment_lib.angle_degrees(np.array([1.0, 0.0]),
                                       np.array([0.5, np.sqrt(3) / 2]))) == \
        pytest.approx(60.0, abs=1e-4)
    # A zero vector has cosine 0 (documented), not NaN.
    assert float(alignment_lib.cosine(np.zeros(3, np.float32), np.ones(3, np.float32))) == 0.0


def test_cosine_and_angle_of_pytrees_are_those_of_the_concatenated_vectors():
    rng = np.random.default_rng(1)
    a = [rng.normal(size=(6, 4)), rng.normal(size=(4,)), rng.normal(size=(3, 2))]
    b = [x + 0.5 * rng.normal(size=x.shape) for x in a]
    a32, b32 = ([x.astype(np.float32) for x in t] for t in (a, b))
    flat_a, flat_b = (np.concatenate([x.ravel() for x in t]) for t in (a, b))
    cos = np_cosine(flat_a, flat_b)
    assert float(alignment_lib.cosine(a32, b32)) == pytest.approx(cos, abs=1e-6)
    assert float(alignment_lib.angle_degrees(a32, b32)) == pytest.approx(
        np.degrees(np.arccos(cos)), abs=1e-3)
    # A pair 0.01° apart: the angle stays exact where arccos of a float32 cosine would not.
    theta = np.radians(0.01)
    u, v = np.array([1.0, 0.0, 0.0], np.float32), np.array([0.0, 1.0, 0.0], np.float32)
    tilted = (np.cos(theta) * u + np.sin(theta) * v).astype(np.float32)
    assert float(alignment_lib.angle_degrees([u[:1], u[1:]], [tilted[:1], tilted[1:]])) == \
        pytest.approx(0.01, rel=1e-3)


def test_kernel_layers_finds_every_kernel_by_path():
    model, params, model_state, x, t = small_problem("kp")
    found = alignment_lib.kernel_layers(params)
    assert set(found) == {"layer_0", "layer_1", "layer_2"}
    assert set(found["layer_0"]) == {"kernel", "bias", layers.FEEDBACK_KERNEL}
    np.testing.assert_array_equal(found["layer_1"]["kernel"], params["layer_1"]["kernel"])
    nested = {"block": {"dense": {"kernel": np.ones((2, 2))}, "norm": {"scale": np.ones(2)}}}
    assert set(alignment_lib.kernel_layers(nested)) == {"block/dense"}


class Recorder(Callback):
    """Copies of the logs and parameters at the start and at every chunk end."""

    def __init__(self):
        self.logs = []
        self.params = {}

    def _keep(self, step, state):
        # Copies: the next chunk program donates the state's buffers.
        self.params[step] = jax.tree.map(lambda a: np.array(a, np.float64, copy=True),
                                         state.params)

    def on_fit_start(self, trainer, state):
        self._keep(int(state.step), state)

    def on_train_chunk_end(self, trainer, state, step, logs):
        assert int(state.step) == step
        self.logs.append((step, dict(logs)))
        self._keep(step, state)


def linear_teacher(n, seed, inputs=30, outputs=10):
    rng = np.random.default_rng(seed)
    teacher = (rng.normal(size=(inputs, outputs)) / np.sqrt(inputs)).astype(np.float32)
    x = rng.uniform(-1, 1, (n, inputs)).astype(np.float32)
    return batches.Split(x, (x @ teacher).astype(np.float32))


@pytest.mark.parametrize("mode, factor", [("bp", 0.5), ("interpolate_fa_bp", 0.0)])
def test_backprop_trained_with_alignment_has_angle_zero(mode, factor):
    """BP, and the interpolation at λ = 0 (which is BP), match the reference exactly."""
    recorder = Recorder()
    task = Task(module=models.BioNeuralNetwork(hidden_layers=(8,), activations=("tanh",),
                                               features=3, rule=mode,
                                               interpolation_factor=factor),
                loss=losses_lib.mean_squared_error, optimizer=optax.sgd(0.1),
                metrics=trainer_metrics.RegressionMetrics, step_metrics=[alignment_lib.Alignment(every=3)])
    Trainer(max_epochs=2, log_every_steps=4, callbacks=[recorder], progress_bar=False).fit(
        task, linear_teacher(128, 0, inputs=5, outputs=3), batch_size=16)
    assert len(recorder.logs) == 4
    for _, logs in recorder.logs:
        angles = {k: v for k, v in logs.items() if k.startswith("alignment/grad_angle/")}
        assert set(angles) == {"alignment/grad_angle/layer_0", "alignment/grad_angle/layer_1",
                               "alignment/grad_angle/all"}
        assert all(0.0 <= v < 1e-3 for v in angles.values()), angles
        for key in ("layer_0", "layer_1", "all"):
            assert logs[f"alignment/grad_cosine/{key}"] == pytest.approx(1.0, abs=1e-6)
        assert logs["alignment/relative_grad_norm"] == pytest.approx(1.0, abs=1e-5)


# --- Lillicrap et al. 2016: FA comes to align with backprop --------------------------------


def test_feedback_alignment_angle_falls_below_90_on_a_linear_teacher():
    recorder = Recorder()
    task = Task(module=models.BioNeuralNetwork(hidden_layers=(20,), activations=("identity",),
                                               features=10, rule="fa"),
                loss=losses_lib.mean_squared_error, optimizer=optax.sgd(0.3),
                metrics=trainer_metrics.RegressionMetrics, step_metrics=[alignment_lib.Alignment(every=4)])
    # 32 steps per epoch, one log interval per epoch, 8 alignment samples per interval.
    Trainer(max_epochs=20, log_every_steps=32, callbacks=[recorder], progress_bar=False,
            seed=0).fit(task, linear_teacher(1024, 0), batch_size=32)
    assert [s for s, _ in recorder.logs] == list(range(32, 641, 32))
    angles = np.array([logs["alignment/grad_angle/layer_0"] for _, logs in recorder.logs])
    losses = np.array([logs["train/loss"] for _, logs in recorder.logs])
    cosines = np.array([logs["alignment/grad_cosine/layer_0"] for _, logs in recorder.logs])
    # It learns.
    assert losses[-1] < 0.01 * losses[0]
    # The hidden layer's angle starts near 90° (random B) and falls well below it.
    assert 75.0 < angles[0] < 105.0, angles
    assert angles[-5:].mean() < 70.0, angles
    assert angles[-5:].mean() < angles[0] - 15.0, angles
    # ... and decreases over training: each third of the run is lower on average.
    thirds = [part.mean() for part in np.array_split(angles, 3)]
    assert thirds[0] > thirds[1] > thirds[2], (thirds, angles)
    # The cosine is the cosine of that angle (both averaged over the same steps, so only
    # approximately), and the output layer is trained by the true error.
    assert np.all(cosines[-5:] > 0.3)
    assert all(logs["alignment/grad_angle/layer_1"] < 1e-3 for _, logs in recorder.logs)


# --- Kolen & Pollack 1994: B follows W under weight decay ----------------------------------


def test_kolen_pollack_with_weight_decay_aligns_w_and_b_geometrically():
    lr, wd, every = 0.2, 0.1, 16
    ratio = 1.0 - lr * wd
    recorder = Recorder()
    task = Task(module=models.BioNeuralNetwork(hidden_layers=(20,), activations=("tanh",),
                                               features=10, rule="kp"),
                loss=losses_lib.mean_squared_error,
                optimizer=optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr)),
                metrics=trainer_metrics.RegressionMetrics,
                step_metrics=[alignment_lib.Alignment(every=every)])
    trainer = Trainer(max_epochs=20, log_every_steps=every, callbacks=[recorder],
                      progress_bar=False, seed=0)
    state = trainer.fit(task, linear_teacher(512, 0), batch_size=32).state
    total = 20 * 512 // 32
    assert int(state.step) == total
    assert [s for s, _ in recorder.logs] == list(range(every, total + 1, every))

    for name in ("layer_0", "layer_1"):
        w0 = recorder.params[0][name]["kernel"]
        b0 = recorder.params[0][name][layers.FEEDBACK_KERNEL]
        initial = np.linalg.norm(w0 - b0)
        assert abs(np_cosine(w0, b0)) < 0.3  # independent random init

        # (b) ‖W_t − B_t‖ = (1 − lr·wd)^t ‖W_0 − B_0‖ at every chunk end and at the end.
        for step, params in recorder.params.items():
            difference = np.linalg.norm(params[name]["kernel"] -
                                        params[name][layers.FEEDBACK_KERNEL])
            assert difference == pytest.approx(initial * ratio ** step, rel=1e-4), (name, step)
        final = state.params[name]
        assert np.linalg.norm(np.asarray(final["kernel"], np.float64) -
                              np.asarray(final[layers.FEEDBACK_KERNEL], np.float64)) == \
            pytest.approx(initial * ratio ** total, rel=1e-4)
        assert ratio ** total < 1e-2  # it really shrank

        # The logged norm: one alignment per interval, at its first step s, before the update.
        for step, logs in recorder.logs:
            s = step - every
            assert logs[f"alignment/weight_difference_norm/{name}"] == pytest.approx(
                initial * ratio ** s, rel=1e-4), (name, step)
            # and the logged weight cosine is that of the parameters at step s.
            params = recorder.params[s][name]
            assert logs[f"alignment/weight_cosine/{name}"] == pytest.approx(
                np_cosine(params["kernel"], params[layers.FEEDBACK_KERNEL]), abs=1e-5)

        # (a) the weight alignment rises from ~0 towards 1.
        cosines = np.array([logs[f"alignment/weight_cosine/{name}"]
                            for _, logs in recorder.logs])
        assert abs(cosines[0]) < 0.3, cosines
        assert cosines[-1] > 0.99, cosines
        assert np.all(np.diff(cosines[len(cosines) // 4:]) > 0), cosines
    # W itself did not just decay away: B converged to a W that still carries the task.
    assert np.linalg.norm(np.asarray(state.params["layer_0"]["kernel"])) > 0.1


def test_sigmoid_losses_and_their_gradients_match_the_hand_derived_forms():
    logits = jnp.array([[0.5, -1.0, 2.0], [0.0, 0.0, 0.0]])
    labels = jnp.array([2, 0])
    onehot = np.eye(3)[np.asarray(labels)]
    sigma = 1 / (1 + np.exp(-np.asarray(logits)))
    # Σ_j −[y log σ + (1 − y) log(1 − σ)]; at z = 0 every class costs log 2.
    bce = -(onehot * np.log(sigma) + (1 - onehot) * np.log(1 - sigma)).sum(axis=1)
    np.testing.assert_allclose(losses_lib.sigmoid_cross_entropy(logits, labels), bce, rtol=1e-6)
    np.testing.assert_allclose(bce[1], 3 * np.log(2), rtol=1e-6)
    np.testing.assert_allclose(
        jax.grad(lambda z: losses_lib.sigmoid_cross_entropy(z, labels).sum())(logits),
        sigma - onehot, rtol=1e-6)
    np.testing.assert_allclose(losses_lib.sigmoid_squared_error(logits, labels),
                               0.5 * ((sigma - onehot) ** 2).sum(axis=1), rtol=1e-6)
    np.testing.assert_allclose(
        jax.grad(lambda z: losses_lib.sigmoid_squared_error(z, labels).sum())(logits),
        (sigma - onehot) * sigma * (1 - sigma), rtol=1e-5)


def test_relative_grad_norm_is_defined_when_gradients_vanish():
    """A network whose weights are all zero (DFA and FA start so in Nøkland 2016) gives
    backprop no gradient through the hidden layers: the ratio stays finite or inf, never NaN."""
    module = models.BioNeuralNetwork(hidden_layers=(4,), activations=("tanh",), features=2,
                                     rule="fa", kernel_init=jax.nn.initializers.zeros)
    x, y = jnp.ones((3, 5)), jnp.array([0, 1, 1])
    variables = module.init(jax.random.key(0), x)
    params = variables.pop("params")

    def loss(p):
        return losses_lib.softmax_cross_entropy(module.apply({"params": p, **variables}, x), y).mean()

    zero = jax.tree.map(jnp.zeros_like, params)
    values = alignment_lib.Alignment(1)(loss, params, variables, zero)
    assert values["alignment/relative_grad_norm"] == jnp.inf  # BP's output bias moves
    assert alignment_lib._norm_ratio(jnp.zeros(3), jnp.zeros(3)) == 1.0  # pylint: disable=protected-access
    assert alignment_lib._norm_ratio(jnp.ones(4), 2 * jnp.ones(4)) == 0.5  # pylint: disable=protected-access


def test_loss_for_picks_the_named_loss_or_the_problems_default():
    logits, labels = jnp.array([[2.0, 0.0, -1.0]]), jnp.array([1])
    log_softmax = np.log(np.exp([2.0, 0.0, -1.0]) / np.exp([2.0, 0.0, -1.0]).sum())
    default = losses_lib.loss_for("classification")
    np.testing.assert_allclose(default(logits, labels), [-log_softmax[1]], rtol=1e-6)
    squared = losses_lib.loss_for("classification", "sigmoid_squared_error")
    sigma = 1 / (1 + np.exp(-np.array([2.0, 0.0, -1.0])))
    np.testing.assert_allclose(squared(logits, labels),
                               [0.5 * np.sum((sigma - [0, 1, 0]) ** 2)], rtol=1e-6)
    mse = losses_lib.loss_for("regression")
    np.testing.assert_allclose(mse(jnp.array([[1.0, 3.0]]), jnp.array([[0.0, 0.0]])), [5.0])
    with pytest.raises(KeyError):
        losses_lib.loss_for("regression", "softmax_cross_entropy")
