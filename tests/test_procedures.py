"""DRTP and sDFA (Frenkel, Lefebvre & Bol 2021) against hand-written float64 NumPy, and
their errors. The reference: ChFrenkel/DirectRandomTargetProjection's hooks replace the
gradient at each hidden layer's output by ``y* B`` (DRTP, the one-hot target, summed over
the batch) or ``sign(y − y*) B`` (sDFA); the output layer keeps its true gradient."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

import bioflax
from bioflax import procedures, rules, targets, trainer, zoo
from bioflax.trainer.task import init_state
from tests.float64 import ATOL, RTOL, float64_only  # noqa: F401  (fixture)


class TanhNet(nn.Module):
    """784-style chain as DRTP's reference: tanh hidden layers, a sigmoid output."""

    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Dense(6)(x))
        x = jnp.tanh(nn.Dense(5)(x))
        return nn.Dense(3)(x)  # logits; the loss applies the sigmoid


def bce(logits, labels):
    return optax.sigmoid_binary_cross_entropy(logits, jax.nn.one_hot(labels, 3)).mean()


def setup(rule):
    x = np.random.default_rng(0).normal(size=(4, 7))
    labels = np.array([0, 2, 1, 2])
    model = bioflax.convert(TanhNet(), rule)
    variables = jax.tree.map(lambda v: np.asarray(v, np.float64) * 3.0,
                             model.init(jax.random.key(1), x))
    return model, variables, x, labels


def reference(variables, x, labels, projected):
    """Gradients by hand: the hidden layers' δ_l = tanh'(a_l) ⊙ (s B_lᵀ) with s
    ``projected(e, y*)``, B_l at the input of the layer above (its ``output_feedback``)."""
    p, fb = variables["params"], variables["feedback"]
    w = [np.asarray(p[f"Dense_{i}"]["kernel"]) for i in range(3)]
    b = [np.asarray(p[f"Dense_{i}"]["bias"]) for i in range(3)]
    a0 = x @ w[0] + b[0]
    h0 = np.tanh(a0)
    a1 = h0 @ w[1] + b[1]
    h1 = np.tanh(a1)
    logits = h1 @ w[2] + b[2]
    target = np.eye(3)[labels]
    error = (1 / (1 + np.exp(-logits)) - target) / target.size  # ∂ mean BCE / ∂ logits
    signal = projected(error, target)
    d1 = (1 - h1 ** 2) * (signal @ np.asarray(fb["Dense_2"]["output_feedback"]).T)
    d0 = (1 - h0 ** 2) * (signal @ np.asarray(fb["Dense_1"]["output_feedback"]).T)
    return {"Dense_0": {"kernel": x.T @ d0, "bias": d0.sum(0)},
            "Dense_1": {"kernel": h0.T @ d1, "bias": d1.sum(0)},
            "Dense_2": {"kernel": h1.T @ error, "bias": error.sum(0)}}


def gradients(model, variables, x, labels):
    def loss(params):
        return bce(model.apply({**variables, "params": params}, x), labels)

    with targets.visible(jnp.asarray(labels)):
        return jax.grad(loss)(variables["params"])


@pytest.mark.parametrize("rule, projected", [
    ("drtp", lambda error, target: target),
    (rules.DirectFeedbackAlignment(signal="sign"), lambda error, target: np.sign(error)),
    ("dfa", lambda error, target: error),
])
def test_hidden_layers_receive_the_projected_target_or_error_sign(rule, projected):
    model, variables, x, labels = setup(rule)
    expected = reference(variables, x, labels, projected)
    got = gradients(model, variables, x, labels)
    jax.tree.map(lambda g, e: np.testing.assert_allclose(g, e, rtol=RTOL, atol=ATOL),
                 got, expected)


def test_drtp_trains_in_the_trainer_which_provides_the_targets():
    """The trainer's step runs the model inside ``targets.visible``: its first update is the
    hand-computed DRTP gradient (plain SGD, one batch of the four examples)."""
    model, variables, x, labels = setup("drtp")
    task = trainer.Task(
        model, loss=lambda y, t: optax.sigmoid_binary_cross_entropy(
            y, jax.nn.one_hot(t, 3)).mean(-1),
        optimizer=optax.sgd(1.0), metrics=trainer.ClassificationMetrics)
    loop = trainer.Trainer(max_epochs=1, report_progress=False, progress_bar=False)
    state = init_state(task, jax.random.key(0), x, None).replace(
        params=variables["params"], model_state={"feedback": variables["feedback"]})
    result = loop.fit(task, trainer.ArrayData(x, labels.astype(np.int32)), batch_size=4,
                      state=state)
    expected = reference(variables, x, labels, lambda error, target: target)
    jax.tree.map(lambda new, old, g: np.testing.assert_allclose(new, old - g, rtol=1e-8),
                 result.state.params, variables["params"], expected)


def test_drtp_refuses_a_regression_target_and_a_call_without_targets():
    model, variables, x, _ = setup("drtp")

    def loss(params, labels):
        with targets.visible(labels):
            return jnp.sum(model.apply({**variables, "params": params}, x))

    with pytest.raises(ValueError, match="integer labels of shape \\(4,\\).*use 'dfa'"):
        jax.grad(loss)(variables["params"], jnp.ones((4, 3)))
    with pytest.raises(ValueError, match="bioflax.targets.visible"):
        jax.grad(lambda p: jnp.sum(model.apply({**variables, "params": p}, x)))(
            variables["params"])
    with pytest.raises(ValueError, match="DRTP projects the target"):
        rules.get_rule("drtp", signal="sign")
    with pytest.raises(ValueError, match="Unknown signal 'sgn'"):
        rules.get_rule("dfa", signal="sgn")


# --- weight mirrors -------------------------------------------------------------------------


class SigmoidNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(jax.nn.sigmoid(nn.Dense(4)(x)))


def fa_state(seed=1):
    x = np.random.default_rng(seed).normal(size=(6, 5))
    model = bioflax.convert(SigmoidNet(), "fa")
    variables = jax.tree.map(lambda v: np.asarray(v, np.float64), model.init(jax.random.key(seed), x))
    return model, variables, x


def test_mirror_update_adds_rate_times_noise_transposed_times_response():
    """One mirror step by hand on the same noise: B += η x̃ᵀ σ(x̃ W + b), per layer."""
    _, variables, _ = fa_state()
    mirror = procedures.WeightMirror(mirror_rate=0.1, noise_amplitude=0.4, mirror_batch=7,
                                     response="sigmoid", feedback_decay=0.01)
    key = jax.random.key(3)
    got = mirror.mirror(variables["params"], variables["feedback"], key)
    for i, path in enumerate(sorted(variables["feedback"])):  # the order mirror() visits
        w = variables["params"][path]["kernel"]
        b = variables["params"][path]["bias"]
        noise = 0.4 * (np.asarray(jax.random.uniform(jax.random.fold_in(key, i),
                                                     (7, w.shape[0]), jnp.float64)) - 0.5)
        response = 1 / (1 + np.exp(-(noise @ w + b)))
        expected = 0.99 * variables["feedback"][path]["feedback_kernel"] + 0.1 * noise.T @ response
        np.testing.assert_allclose(got[path]["feedback_kernel"], expected, rtol=RTOL, atol=ATOL)


def test_mirrored_b_turns_towards_w_and_the_pretraining_pass_runs_at_init():
    model, variables, x = fa_state()
    mirror = procedures.WeightMirror(mirror_batch=4096, pretrain_steps=200, mirror_rate=0.05)
    params, state = mirror.init(None, variables["params"], {"feedback": variables["feedback"]},
                                jax.random.key(0), x)
    for path in variables["feedback"]:
        w = np.ravel(params[path]["kernel"])
        before = np.ravel(variables["feedback"][path]["feedback_kernel"])
        after = np.ravel(state["feedback"][path]["feedback_kernel"])
        cosine = lambda a, b: a @ b / np.linalg.norm(a) / np.linalg.norm(b)
        assert cosine(after, w) > 0.95 > abs(cosine(before, w)), path


def test_weight_mirrors_need_fas_feedback_kernel():
    model = SigmoidNet()
    variables = model.init(jax.random.key(0), np.ones((2, 5)))
    with pytest.raises(ValueError, match="convert the model with rule 'fa'"):
        procedures.WeightMirror().init(None, variables["params"], {}, jax.random.key(0), None)


# --- PEPITA ---------------------------------------------------------------------------------


class ReluNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Dense(6, use_bias=False)(x.reshape((x.shape[0], -1))))
        x = nn.Dropout(0.5, deterministic=not train)(x)
        return nn.Dense(3, use_bias=False)(x)


def softmax_cross_entropy(y, t):
    return optax.softmax_cross_entropy_with_integer_labels(y, t)


def pepita_task(scale=1.0):
    return trainer.Task(ReluNet(), loss=softmax_cross_entropy, optimizer=optax.sgd(0.1),
                        metrics=trainer.ClassificationMetrics, rng_streams=("dropout",),
                        procedure=procedures.Pepita(input_feedback_scale=scale))


def test_pepita_update_by_hand_two_passes_no_backward():
    """Dropout off (its mask is shared, so it cancels in the test below): ΔW₁ =
    x'ᵀ(h − h')/N, ΔW₂ = h'ᵀ e'/N with x' = x + e Fᵀ, e = softmax(y) − onehot(t)."""
    x = np.random.default_rng(0).normal(size=(5, 2, 2))
    labels = np.array([0, 1, 2, 1, 0])
    task = dataclasses.replace(pepita_task(), rng_streams=())
    state = init_state(task, jax.random.key(0), x, None)
    batch = {"input": jnp.asarray(x), "target": jnp.asarray(labels)}
    state = state.replace(params=jax.tree.map(lambda p: p * 3.0, state.params))

    def loss_and_outputs(params):  # the trainer's, in evaluation mode (no dropout)
        outputs = task.module.apply({"params": params}, batch["input"])
        per_example = task.loss(outputs, batch["target"])
        return per_example.mean(), (outputs, per_example, state.model_state)

    task = dataclasses.replace(task, train_flag=False)
    grads, _ = task.procedure.update(task, state, batch, loss_and_outputs)
    w1 = np.asarray(state.params["Dense_0"]["kernel"])
    w2 = np.asarray(state.params["Dense_1"]["kernel"])
    f = np.asarray(state.model_state["pepita"]["input_feedback"])
    flat = x.reshape(5, -1)

    def forward(inputs):
        h = np.maximum(inputs @ w1, 0)
        y = h @ w2
        p = np.exp(y - y.max(1, keepdims=True))
        return h, p / p.sum(1, keepdims=True) - np.eye(3)[labels]

    h, e = forward(flat)
    modulated = flat + e @ f.T
    h_mod, e_mod = forward(modulated)
    np.testing.assert_allclose(grads["Dense_0"]["kernel"], modulated.T @ (h - h_mod) / 5,
                               rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(grads["Dense_1"]["kernel"], h_mod.T @ e_mod / 5,
                               rtol=RTOL, atol=ATOL)
    bound = 1.0 * np.sqrt(6 / 4)
    assert f.shape == (4, 3) and np.all(np.abs(f) <= bound)


def test_pepita_shares_the_dropout_mask_between_its_passes():
    """With F = 0 the two passes see the same input; equal masks make h − h' vanish."""
    x = np.random.default_rng(0).normal(size=(8, 4))
    labels = np.arange(8) % 3
    task = pepita_task(scale=0.0)
    loop = trainer.Trainer(max_epochs=1, report_progress=False, progress_bar=False)
    state = init_state(task, jax.random.key(0), x, None)
    before = jax.tree.map(np.asarray, state.params)  # fit donates the state's buffers
    result = loop.fit(task, trainer.ArrayData(x, labels.astype(np.int32)), batch_size=8,
                      state=state)
    np.testing.assert_array_equal(result.state.params["Dense_0"]["kernel"],
                                  before["Dense_0"]["kernel"])
    assert not np.array_equal(result.state.params["Dense_1"]["kernel"],
                              before["Dense_1"]["kernel"])


def test_unknown_procedures_and_options_are_refused():
    with pytest.raises(ValueError, match="Unknown procedure 'pepitta'"):
        procedures.get_procedure("pepitta")
    with pytest.raises(ValueError, match="takes the options .*mirror_rate"):
        procedures.get_procedure("weight_mirror", rate=0.1)
    with pytest.raises(ValueError, match="Unknown mirror response"):
        procedures.get_procedure("weight_mirror", response="tanh")


# --- Forward-Forward ------------------------------------------------------------------------


def ff_setup():
    x = np.abs(np.random.default_rng(0).normal(size=(4, 2, 4)))  # 8 inputs, the first 3 labels
    labels = np.array([0, 2, 1, 2], np.int32)
    net = zoo.ForwardForwardNet(widths=(5, 6), num_classes=3)
    procedure = procedures.ForwardForward(num_classes=3, peer_normalization=0.5)
    task = trainer.Task(net, loss=softmax_cross_entropy, optimizer=optax.sgd(0.1),
                        metrics=trainer.ClassificationMetrics, rng_streams=(),
                        procedure=procedure)
    state = init_state(task, jax.random.key(0), x, None)
    params = jax.tree.map(lambda p: p + 0.3 * np.random.default_rng(1).normal(size=p.shape),
                          state.params)  # a nonzero classifier too
    return task, state.replace(params=params), x, labels


def np_ff(params, x, labels, wrong, running, n=3, neutral=0.1, peer=0.5, momentum=0.9):
    """Forward-Forward's loss by hand (loeweX/Forward-Forward's ``ff_model.py``)."""
    def norm(z):
        return z / (np.sqrt(np.mean(z ** 2, -1, keepdims=True)) + 1e-8)

    def embed(values):
        flat = x.reshape(len(x), -1).copy()
        flat[:, :n] = values
        return flat

    def forward(inputs):
        z, activities = norm(inputs), []
        for i in range(2):
            a = np.maximum(z @ params[f"layer{i}"]["kernel"] + params[f"layer{i}"]["bias"], 0)
            activities.append(a)
            z = norm(a)
        return activities

    both = np.concatenate([embed(np.eye(n)[labels]), embed(np.eye(n)[wrong])])
    target = np.r_[np.ones(len(x)), np.zeros(len(x))]
    total = 0.0
    for i, a in enumerate(forward(both)):
        logit = (a ** 2).sum(-1) - a.shape[-1]
        total += np.mean(np.logaddexp(0, logit) - target * logit)  # BCE with logits
        r = momentum * running[str(i)] + (1 - momentum) * a[:len(x)].mean(0)
        total += peer * np.mean((r.mean() - r) ** 2)
    features = np.concatenate([norm(a) for a in forward(embed(np.full((len(x), n), neutral)))[1:]], -1)
    logits = features @ params["classifier"]["kernel"]
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return total - log_p[np.arange(len(x)), labels].mean()


def test_forward_forward_loss_by_hand_and_local_gradients():
    task, state, x, labels = ff_setup()
    wrong = np.array([1, 0, 2, 1], np.int32)
    procedure = task.procedure
    loss, _ = procedure.loss(task, state.params, state, x, labels, wrong)
    running = jax.tree.map(np.asarray, state.model_state["forward_forward"])
    np.testing.assert_allclose(loss, np_ff(jax.tree.map(np.asarray, state.params), x, labels,
                                           wrong, running), rtol=1e-10)

    def layer0_grad(params):
        return jax.grad(lambda p: procedure.loss(task, p, state, x, labels, wrong)[0])(
            params)["layer0"]["kernel"]

    changed = {**state.params, "layer1": jax.tree.map(lambda p: 2 * p, state.params["layer1"]),
               "classifier": jax.tree.map(lambda p: -p, state.params["classifier"])}
    np.testing.assert_allclose(layer0_grad(changed), layer0_grad(state.params), rtol=1e-12)


def test_forward_forward_negatives_are_wrong_labels_and_both_predictions_by_hand():
    task, state, x, labels = ff_setup()
    grads, (loss, (logits, _, model_state)) = task.procedure.update(
        task, state, {"input": x, "target": labels}, None)
    assert np.isfinite(loss) and set(model_state["forward_forward"]) == {"0", "1"}
    for step in range(20):  # the negative label is never the true one
        key = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(state.rng),
                                                    step), procedures._NEGATIVE_STREAM)
        wrong = (labels + np.asarray(jax.random.randint(key, labels.shape, 1, 3))) % 3
        assert np.all(wrong != labels)
    by_goodness = dataclasses.replace(task.procedure, prediction="goodness")
    goodness = np.asarray(by_goodness.predict(task, state, x))
    params = jax.tree.map(np.asarray, state.params)
    for label in range(3):
        flat = x.reshape(4, -1).copy()
        flat[:, :3] = np.eye(3)[label]
        z = flat / (np.sqrt(np.mean(flat ** 2, -1, keepdims=True)) + 1e-8)
        a0 = np.maximum(z @ params["layer0"]["kernel"] + params["layer0"]["bias"], 0)
        z = a0 / (np.sqrt(np.mean(a0 ** 2, -1, keepdims=True)) + 1e-8)
        a1 = np.maximum(z @ params["layer1"]["kernel"] + params["layer1"]["bias"], 0)
        np.testing.assert_allclose(goodness[:, label], (a1 ** 2).sum(-1), rtol=1e-10)
    with pytest.raises(ValueError, match="Unknown Forward-Forward prediction"):
        procedures.ForwardForward(prediction="vote")


def test_forward_forward_refuses_a_network_without_activities():
    with pytest.raises(ValueError, match="ForwardForwardNet"):
        trainer_task = trainer.Task(SigmoidNet(), loss=softmax_cross_entropy,
                                    optimizer=optax.sgd(0.1),
                                    metrics=trainer.ClassificationMetrics,
                                    procedure=procedures.ForwardForward(num_classes=3))
        init_state(trainer_task, jax.random.key(0), np.ones((2, 5)), None)


# --- a procedure's own step resumes exactly -------------------------------------------------


class Killed(Exception):
    pass


class KillAtStep(trainer.Callback):
    def __init__(self, step):
        self.step = step

    def on_train_chunk_end(self, trainer_, state, step, logs):
        if step == self.step:
            raise Killed


def mirror_run(directory, *extra):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 5)).astype(np.float32)
    labels = (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0).astype(np.int32)
    task = trainer.Task(bioflax.convert(SigmoidNet(), "fa"), loss=softmax_cross_entropy,
                        optimizer=optax.sgd(0.5), metrics=trainer.ClassificationMetrics,
                        procedure=procedures.WeightMirror(mirror_batch=16, pretrain_steps=3))
    loop = trainer.Trainer(max_epochs=3, log_every_steps=2, progress_bar=False,
                           report_progress=False, seed=3,
                           callbacks=[trainer.ModelCheckpoint(directory, every_n_steps=4),
                                      *extra])
    return loop.fit(task, trainer.ArrayData(x, labels), batch_size=16, resume=True)


def test_a_killed_weight_mirror_run_resumes_to_the_state_of_an_uninterrupted_one(tmp_path):
    with jax.enable_x64(False):
        uninterrupted = mirror_run(tmp_path / "uninterrupted")
        with pytest.raises(Killed):
            mirror_run(tmp_path / "killed", KillAtStep(6))
        resumed = mirror_run(tmp_path / "killed")
    assert resumed.first_step == 4 and int(uninterrupted.state.step) == 12
    for name in ("params", "model_state", "opt_state"):
        want, got = getattr(uninterrupted.state, name), getattr(resumed.state, name)
        for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
            np.testing.assert_array_equal(a, b, err_msg=name)
