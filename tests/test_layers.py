"""Tests of the feedback layers against gradients derived by hand (README's rule table).

Every expected gradient here comes from a small float64 NumPy implementation of the
equations, tests/numpy_reference.py (forward pass storing ``x_l`` and ``a_l``, then one
backward pass per rule, with hand-written derivatives of the activations and of the loss). JAX's autodiff is only used
to differentiate *through the code under test*; it is never compared with itself.

All tests run with 64-bit floats enabled through the ``jax.enable_x64`` context (an
autouse fixture), so other test modules keep JAX's default 32-bit mode.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

import bioflax
from bioflax import (
    BioNeuralNetwork,
    RandomDenseLinearDFAHidden,
    RandomDenseLinearDFAOutput,
    RandomDenseLinearFA,
    RandomDenseLinearInterpolateFABP,
    RandomDenseLinearKP,
)
from float64 import ATOL, RTOL, abstract_init, float64_only, randomize  # noqa: F401
from numpy_reference import (NP_ACTIVATIONS, NP_LOSSES, np_backward_chain,  # noqa: F401
                             np_forward, np_mse, np_reference, np_softmax_xent)


# =========================================================================================
# The JAX side of the NumPy reference (tests/numpy_reference.py)
# =========================================================================================


# the same activations as JAX callables, for user-built modules
JAX_ACTIVATIONS = {
    "tanh": jnp.tanh,
    "sigmoid": nn.sigmoid,
    "relu": nn.relu,
    "identity": lambda a: a,
}


def jax_loss(name, y, t):
    n = y.shape[0]
    if name == "mse":
        return 0.5 * jnp.sum((y - t) ** 2) / n
    return -jnp.sum(t * jax.nn.log_softmax(y)) / n


# =========================================================================================
# Helpers on the JAX side
# =========================================================================================


def make_data(seed, batch, in_shape, n_out, loss):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, *in_shape))
    if loss == "mse":
        t = rng.normal(size=(batch, n_out))
    else:
        t = np.eye(n_out)[rng.integers(0, n_out, size=batch)]
    return x, t


def jax_grads(model, variables, x, t, loss):
    """Loss, output and gradients wrt ALL variables (feedback collection included) and x."""

    def f(v, inputs):
        y = model.apply(v, inputs)
        return jax_loss(loss, y, t), y

    (value, y), (g_vars, g_x) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(
        variables, jnp.asarray(x))
    return value, y, g_vars, g_x


def feedback_of(variables, name, kp):
    if kp:
        return np.asarray(variables["params"][name]["feedback_kernel"])
    if "feedback" in variables and name in variables["feedback"]:
        return np.asarray(variables["feedback"][name]["feedback_kernel"])
    return None


def assert_close(got, want, what):
    np.testing.assert_allclose(np.asarray(got), want, rtol=RTOL, atol=ATOL, err_msg=what)


def check_grads(grads, g_x, names, ref_grads, kp=False, check_dx=True):
    d_kernels, d_biases, d_feedbacks, dx = ref_grads
    for index, name in enumerate(names):
        assert_close(grads["params"][name]["kernel"], d_kernels[index], f"dW of {name}")
        assert_close(grads["params"][name]["bias"], d_biases[index], f"db of {name}")
        got_db = feedback_of(grads, name, kp)
        if d_feedbacks[index] is None:
            assert got_db is None, f"{name} should have no feedback matrix"
        else:
            assert got_db is not None, f"{name} should have a feedback matrix"
            if not kp:
                # fixed feedback: exactly zero, not merely small
                assert np.array_equal(got_db, np.zeros_like(got_db)), f"dB of {name}"
            assert_close(got_db, d_feedbacks[index], f"dB of {name}")
    if check_dx:
        assert_close(g_x.reshape(dx.shape), dx, "input gradient")


# =========================================================================================
# 1. BioNeuralNetwork: every rule against the hand-derived reference
# =========================================================================================

# Two networks: four layers (three hidden with DIFFERENT activations + linear output).
NETWORKS = {
    "mse_tanh_sigmoid_relu": dict(hidden=(7, 6, 5), acts=("tanh", "sigmoid", "relu"),
                                  in_shape=(4,), n_out=3, loss="mse"),
    # image-shaped input (flattened by the network); same widths, so the eager-op
    # compilation cache is shared and the file stays fast
    "xent_relu_tanh_sigmoid_image": dict(hidden=(7, 6, 5), acts=("relu", "tanh", "sigmoid"),
                                         in_shape=(2, 2), n_out=3, loss="xent"),
}

RULES = {  # BioNeuralNetwork's rule -> (reference rule, λ)
    "bp": ("bp", None),
    "fa": ("fa", None),
    "kp": ("kp", None),
    "interpolate_fa_bp": ("interp", 0.3),
    "dfa": ("dfa", None),
}


def build_bio(network_rule, net, seed=0, interpolation_factor=0.5):
    model = BioNeuralNetwork(net["hidden"], net["acts"], net["n_out"], rule=network_rule,
                             interpolation_factor=interpolation_factor)
    x, t = make_data(seed, 6, net["in_shape"], net["n_out"], net["loss"])
    variables = randomize(abstract_init(model, jnp.asarray(x)), seed + 100)
    names = [f"layer_{i}" for i in range(len(net["hidden"]) + 1)]
    return model, variables, names, x, t


def numpy_params(variables, names, kp):
    kernels = [np.asarray(variables["params"][n]["kernel"]) for n in names]
    biases = [np.asarray(variables["params"][n]["bias"]) for n in names]
    feedbacks = [feedback_of(variables, n, kp) for n in names]
    return kernels, biases, feedbacks


@pytest.mark.parametrize("net_name", list(NETWORKS))
@pytest.mark.parametrize("network_rule", list(RULES))
def test_bio_network_gradients_match_hand_derived_reference(network_rule, net_name):
    net = NETWORKS[net_name]
    rule, lam = RULES[network_rule]
    model, variables, names, x, t = build_bio(network_rule, net, interpolation_factor=lam or 0.5)
    kp = network_rule == "kp"
    kernels, biases, feedbacks = numpy_params(variables, names, kp)
    x_flat = x.reshape(x.shape[0], -1)
    lambdas = [lam] * len(names)
    value, y, ref = np_reference(rule, x_flat, kernels, biases, feedbacks, net["acts"], t,
                                 net["loss"], lambdas)

    got_value, got_y, grads, g_x = jax_grads(model, variables, x, t, net["loss"])
    assert_close(got_y, y, "forward output")
    assert_close(got_value, value, "loss")
    # Under DFA the input receives the first layer's δ_0 through W_0ᵀ.
    assert g_x.shape == x.shape
    check_grads(grads, g_x, names, ref, kp=kp)

    # Sanity: the rule really differs from backprop on the lower layers here, so the
    # comparison above could not pass by accident for a non-BP rule.
    if rule != "bp":
        _, _, bp_ref = np_reference("bp", x_flat, kernels, biases, feedbacks, net["acts"], t,
                                    net["loss"])
        assert not np.allclose(ref[0][0], bp_ref[0][0], rtol=1e-3, atol=1e-6)


# =========================================================================================
# 1b. The layers stacked by hand in a user's own nn.Module
# =========================================================================================


class MixedChainNet(nn.Module):
    """FA, KP, interpolation and FA again, with three different activations."""

    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(RandomDenseLinearFA(7, name="fa_in")(x))
        x = nn.sigmoid(RandomDenseLinearKP(6, name="kp")(x))
        x = nn.relu(RandomDenseLinearInterpolateFABP(5, interpolation_factor=0.25,
                                                     name="interp")(x))
        return RandomDenseLinearFA(3, name="fa_out")(x)


class FANet(nn.Module):
    acts: tuple = ("sigmoid", "relu", "tanh")

    @nn.compact
    def __call__(self, x):
        for index, (width, act) in enumerate(zip((7, 6, 5), self.acts)):
            x = JAX_ACTIVATIONS[act](RandomDenseLinearFA(width, name=f"l{index}")(x))
        return RandomDenseLinearFA(3, name="l3")(x)


class DFANet(nn.Module):
    acts: tuple = ("tanh", "sigmoid", "relu")

    @nn.compact
    def __call__(self, x):
        for index, (width, act) in enumerate(zip((7, 6, 5), self.acts)):
            # positional order (features, final_output_dim, activation)
            x = RandomDenseLinearDFAHidden(width, 3, JAX_ACTIVATIONS[act], name=f"l{index}")(x)
        return RandomDenseLinearDFAOutput(3, name="l3")(x)


def _user_variables(model, x, seed):
    return randomize(abstract_init(model, jnp.asarray(x)), seed + 7)


@pytest.mark.parametrize("loss", ["mse", "xent"])
def test_user_module_mixed_rules_match_reference(loss):
    model = MixedChainNet()
    x, t = make_data(1, 6, (4,), 3, loss)
    variables = _user_variables(model, x, 1)
    names = ["fa_in", "kp", "interp", "fa_out"]
    rules = ["fa", "kp", "interp", "fa"]
    acts = ("tanh", "sigmoid", "relu")
    kernels = [np.asarray(variables["params"][n]["kernel"]) for n in names]
    biases = [np.asarray(variables["params"][n]["bias"]) for n in names]
    feedbacks = [feedback_of(variables, n, kp=(n == "kp")) for n in names]
    assert "feedback_kernel" not in variables["params"]["fa_in"]
    assert "kp" not in variables["feedback"]
    value, y, (d_w, d_b, d_fb, dx) = np_reference(rules, x, kernels, biases, feedbacks, acts,
                                                  t, loss, lambdas=[None, None, 0.25, None])

    got_value, got_y, grads, g_x = jax_grads(model, variables, x, t, loss)
    assert_close(got_y, y, "forward")
    assert_close(got_value, value, "loss")
    for index, name in enumerate(names):
        assert_close(grads["params"][name]["kernel"], d_w[index], f"dW {name}")
        assert_close(grads["params"][name]["bias"], d_b[index], f"db {name}")
        got_fb = feedback_of(grads, name, kp=(name == "kp"))
        assert_close(got_fb, d_fb[index], f"dB {name}")
    assert np.array_equal(grads["params"]["kp"]["feedback_kernel"],
                          grads["params"]["kp"]["kernel"])
    assert_close(g_x, dx, "input gradient")


def test_user_module_fa_matches_reference():
    model = FANet()
    x, t = make_data(2, 6, (4,), 3, "xent")
    variables = _user_variables(model, x, 2)
    names = ["l0", "l1", "l2", "l3"]
    kernels = [np.asarray(variables["params"][n]["kernel"]) for n in names]
    biases = [np.asarray(variables["params"][n]["bias"]) for n in names]
    feedbacks = [np.asarray(variables["feedback"][n]["feedback_kernel"]) for n in names]
    _, _, ref = np_reference("fa", x, kernels, biases, feedbacks, model.acts, t, "xent")
    _, _, grads, g_x = jax_grads(model, variables, x, t, "xent")
    check_grads(grads, g_x, names, ref)


@pytest.mark.parametrize("loss", ["mse", "xent"])
def test_user_module_dfa_matches_reference(loss):
    model = DFANet()
    x, t = make_data(3, 6, (4,), 3, loss)
    variables = _user_variables(model, x, 3)
    names = ["l0", "l1", "l2", "l3"]
    kernels = [np.asarray(variables["params"][n]["kernel"]) for n in names]
    biases = [np.asarray(variables["params"][n]["bias"]) for n in names]
    feedbacks = [feedback_of(variables, n, kp=False) for n in names]
    assert feedbacks[3] is None  # the DFA output layer has no B
    assert [fb.shape for fb in feedbacks[:3]] == [(7, 3), (6, 3), (5, 3)]
    _, _, ref = np_reference("dfa", x, kernels, biases, feedbacks, model.acts, t, loss)
    _, _, grads, g_x = jax_grads(model, variables, x, t, loss)
    check_grads(grads, g_x, names, ref)  # the input: δ_0 W_0ᵀ


# =========================================================================================
# Single layers with a linear loss L = Σ out ⊙ R  (so δ of the layer, or e, equals R)
# =========================================================================================


def _single_layer_grads(layer, variables, x, r):
    def f(v, inputs):
        return jnp.sum(layer.apply(v, inputs) * r)

    return jax.grad(f, argnums=(0, 1))(variables, jnp.asarray(x))


@pytest.mark.parametrize("layer_cls", ["fa", "kp", "interp"])
def test_single_chain_layer_with_several_batch_axes(layer_cls):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 3, 4))
    r = rng.normal(size=(2, 3, 5))
    lam = 0.6
    layer = {"fa": RandomDenseLinearFA(5), "kp": RandomDenseLinearKP(5),
             "interp": RandomDenseLinearInterpolateFABP(5, interpolation_factor=lam)}[layer_cls]
    variables = randomize(abstract_init(layer, jnp.asarray(x)), 5)
    kp = layer_cls == "kp"
    w = np.asarray(variables["params"]["kernel"])
    b_mat = np.asarray(variables["params"]["feedback_kernel"] if kp
                       else variables["feedback"]["feedback_kernel"])
    grads, g_x = _single_layer_grads(layer, variables, x, r)

    # dW = Σ over both batch axes of x ⊗ δ, db = Σ δ
    want_dw = np.einsum("abi,abj->ij", x, r)
    assert_close(grads["params"]["kernel"], want_dw, "dW")
    assert_close(grads["params"]["bias"], r.sum(axis=(0, 1)), "db")
    backward = lam * b_mat + (1 - lam) * w if layer_cls == "interp" else b_mat
    assert_close(g_x, r @ backward.T, "dx")
    if kp:
        assert np.array_equal(grads["params"]["feedback_kernel"], grads["params"]["kernel"])
    else:
        assert np.array_equal(grads["feedback"]["feedback_kernel"], np.zeros_like(b_mat))


@pytest.mark.parametrize("in_width", [2, 3, 6])
def test_dfa_hidden_layer_receives_the_projected_output_error(in_width):
    # a DFA hidden layer (width 5) under a DFA output layer (3 outputs), with an operation
    # between them; L = Σ out ⊙ R, so e = R and the hidden δ = φ'(a) ⊙ (e Bᵀ)
    class HiddenThenOutput(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = RandomDenseLinearDFAHidden(5, 3, nn.sigmoid, name="hidden")(x)
            return RandomDenseLinearDFAOutput(3, name="out")(2.0 * h)

    rng = np.random.default_rng(6)
    x = rng.normal(size=(4, in_width))
    e = rng.normal(size=(4, 3))
    model = HiddenThenOutput()
    variables = randomize(abstract_init(model, jnp.asarray(x)), 8)
    w = np.asarray(variables["params"]["hidden"]["kernel"])
    bias = np.asarray(variables["params"]["hidden"]["bias"])
    b_mat = np.asarray(variables["feedback"]["hidden"]["feedback_kernel"])
    assert b_mat.shape == (5, 3)
    grads, g_x = _single_layer_grads(model, variables, x, e)

    a = x @ w + bias
    delta = NP_ACTIVATIONS["sigmoid"][1](a) * (e @ b_mat.T)
    assert_close(grads["params"]["hidden"]["kernel"], x.T @ delta, "dW")
    assert_close(grads["params"]["hidden"]["bias"], delta.sum(0), "db")
    assert_close(grads["params"]["out"]["kernel"], (2.0 * NP_ACTIVATIONS["sigmoid"][0](a)).T @ e,
                 "dW out")
    assert np.array_equal(grads["feedback"]["hidden"]["feedback_kernel"], np.zeros_like(b_mat))
    assert_close(g_x, delta @ w.T, "input cotangent")


@pytest.mark.parametrize("in_width", [2, 3, 6])
def test_dfa_output_single_layer(in_width):
    rng = np.random.default_rng(9)
    x = rng.normal(size=(4, in_width))
    e = rng.normal(size=(4, 3))
    layer = RandomDenseLinearDFAOutput(3)
    variables = randomize(abstract_init(layer, jnp.asarray(x)), 10)
    assert set(variables) == {"params"}
    grads, g_x = _single_layer_grads(layer, variables, x, e)
    assert_close(grads["params"]["kernel"], x.T @ e, "dW")
    assert_close(grads["params"]["bias"], e.sum(0), "db")
    # alone, the output layer is a Dense layer: its input receives e Wᵀ
    assert_close(g_x, e @ np.asarray(variables["params"]["kernel"]).T, "input cotangent")


def test_dfa_chain_with_several_batch_axes():
    # DFA hidden (tanh) -> DFA output on inputs of shape (2, 3, 4); L = Σ out ⊙ R, so e = R
    class TwoLayerDFA(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = RandomDenseLinearDFAHidden(5, 3, jnp.tanh, name="hidden")(x)
            return RandomDenseLinearDFAOutput(3, name="out")(x)

    rng = np.random.default_rng(21)
    x = rng.normal(size=(2, 3, 4))
    e = rng.normal(size=(2, 3, 3))
    model = TwoLayerDFA()
    variables = randomize(abstract_init(model, jnp.asarray(x)), 22)
    w0 = np.asarray(variables["params"]["hidden"]["kernel"])
    b0 = np.asarray(variables["params"]["hidden"]["bias"])
    b_mat = np.asarray(variables["feedback"]["hidden"]["feedback_kernel"])
    grads, g_x = _single_layer_grads(model, variables, x, e)

    a0 = x @ w0 + b0
    h0 = np.tanh(a0)
    delta0 = (1.0 - np.tanh(a0) ** 2) * (e @ b_mat.T)
    assert_close(grads["params"]["out"]["kernel"], np.einsum("abi,abj->ij", h0, e), "dW out")
    assert_close(grads["params"]["out"]["bias"], e.sum((0, 1)), "db out")
    assert_close(grads["params"]["hidden"]["kernel"], np.einsum("abi,abj->ij", x, delta0),
                 "dW hidden")
    assert_close(grads["params"]["hidden"]["bias"], delta0.sum((0, 1)), "db hidden")
    assert_close(g_x, delta0 @ w0.T, "input cotangent")


# =========================================================================================
# 2. Kolen-Pollack: dB == dW, and ‖W − B‖ decays by exactly (1 − lr·wd) per SGD step
# =========================================================================================


def test_kp_feedback_gradient_equals_kernel_gradient_exactly():
    net = NETWORKS["mse_tanh_sigmoid_relu"]
    model, variables, names, x, t = build_bio("kp", net, seed=11)
    _, _, grads, _ = jax_grads(model, variables, x, t, net["loss"])
    for name in names:
        g = grads["params"][name]
        assert np.array_equal(g["feedback_kernel"], g["kernel"]), name
        assert np.abs(np.asarray(g["kernel"])).max() > 0, name


def test_kp_weight_decay_shrinks_kernel_feedback_gap_geometrically():
    net = NETWORKS["mse_tanh_sigmoid_relu"]
    model, variables, names, x, t = build_bio("kp", net, seed=12)
    lr, wd, steps = 0.1, 0.5, 6
    optimizer = optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr))
    params = variables["params"]
    opt_state = optimizer.init(params)

    def loss_fn(p):
        return jax_loss(net["loss"], model.apply({"params": p}, jnp.asarray(x)), t)

    def gaps(p):
        return np.array([np.linalg.norm(np.asarray(p[n]["kernel"])
                                        - np.asarray(p[n]["feedback_kernel"]))
                         for n in names])

    previous = gaps(params)
    assert np.all(previous > 0.1)
    losses = []
    for _ in range(steps):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        losses.append(float(loss))
        updates, opt_state = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        # the step really moves W (not a trivial zero-gradient case)
        assert np.abs(np.asarray(new_params["layer_0"]["kernel"])
                      - np.asarray(params["layer_0"]["kernel"])).max() > 1e-6
        params = new_params
        current = gaps(params)
        np.testing.assert_allclose(current / previous, 1.0 - lr * wd, rtol=1e-10, atol=0)
        previous = current
    assert losses[-1] != losses[0]


# =========================================================================================
# 3. FA / DFA / interpolation: the gradient of B is exactly zero
# =========================================================================================


@pytest.mark.parametrize("network_rule", ["fa", "dfa", "interpolate_fa_bp"])
def test_fixed_feedback_receives_zero_gradient(network_rule):
    net = NETWORKS["xent_relu_tanh_sigmoid_image"]
    model, variables, names, x, t = build_bio(network_rule, net, seed=13)
    assert "feedback" in variables
    _, _, grads, _ = jax_grads(model, variables, x, t, net["loss"])
    assert set(grads["feedback"]) == set(variables["feedback"])
    for name, leaves in grads["feedback"].items():
        fb = np.asarray(leaves["feedback_kernel"])
        assert fb.shape == variables["feedback"][name]["feedback_kernel"].shape
        assert np.array_equal(fb, np.zeros_like(fb)), name
    # ...while the kernels do get gradient
    assert all(np.abs(np.asarray(grads["params"][n]["kernel"])).max() > 0 for n in names)


# =========================================================================================
# 4. Interpolation: λ = 0 is backprop, λ = 1 is FA
# =========================================================================================


@pytest.mark.parametrize("net_name", list(NETWORKS))
def test_interpolation_endpoints(net_name):
    net = NETWORKS[net_name]
    loss = net["loss"]
    model0, variables, names, x, t = build_bio("interpolate_fa_bp", net, seed=14,
                                               interpolation_factor=0.0)
    model1 = BioNeuralNetwork(net["hidden"], net["acts"], net["n_out"],
                              rule="interpolate_fa_bp", interpolation_factor=1.0)
    fa_model = BioNeuralNetwork(net["hidden"], net["acts"], net["n_out"], rule="fa")
    bp_model = BioNeuralNetwork(net["hidden"], net["acts"], net["n_out"], rule="bp")
    kernels, biases, feedbacks = numpy_params(variables, names, kp=False)
    x_flat = x.reshape(x.shape[0], -1)

    _, _, g0, gx0 = jax_grads(model0, variables, x, t, loss)
    _, _, g1, gx1 = jax_grads(model1, variables, x, t, loss)
    _, _, g_fa, gx_fa = jax_grads(fa_model, variables, x, t, loss)
    _, _, g_bp, gx_bp = jax_grads(bp_model, {"params": variables["params"]}, x, t, loss)

    # λ = 0 against the NumPy backprop reference and against the plain nn.Dense network
    _, _, bp_ref = np_reference("bp", x_flat, kernels, biases, feedbacks, net["acts"], t, loss)
    d_w, d_b, _, dx = bp_ref
    for index, name in enumerate(names):
        assert_close(g0["params"][name]["kernel"], d_w[index], f"λ=0 dW {name}")
        assert_close(g0["params"][name]["bias"], d_b[index], f"λ=0 db {name}")
        assert_close(g0["params"][name]["kernel"], np.asarray(g_bp["params"][name]["kernel"]),
                     f"λ=0 vs bp {name}")
    assert_close(gx0.reshape(dx.shape), dx, "λ=0 dx")
    assert_close(gx0, np.asarray(gx_bp), "λ=0 dx vs bp")

    # λ = 1 against the NumPy FA reference and against the FA layer
    _, _, fa_ref = np_reference("fa", x_flat, kernels, biases, feedbacks, net["acts"], t, loss)
    check_grads(g1, gx1, names, fa_ref)
    for index, name in enumerate(names):
        assert_close(g1["params"][name]["kernel"], np.asarray(g_fa["params"][name]["kernel"]),
                     f"λ=1 vs fa {name}")
    assert_close(gx1, np.asarray(gx_fa), "λ=1 dx vs fa")


def test_interpolation_factor_out_of_range_raises():
    x = jnp.ones((2, 3))
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            abstract_init(RandomDenseLinearInterpolateFABP(4, interpolation_factor=bad), x)


# =========================================================================================
# 5. Forward pass equals nn.Dense with the same kernel and bias
# =========================================================================================


FORWARD_LAYERS = {
    "fa": lambda: RandomDenseLinearFA(5),
    "kp": lambda: RandomDenseLinearKP(5),
    "interp": lambda: RandomDenseLinearInterpolateFABP(5, interpolation_factor=0.3),
    "dfa_hidden_tanh": lambda: RandomDenseLinearDFAHidden(5, 3, jnp.tanh),
    "dfa_hidden_relu": lambda: RandomDenseLinearDFAHidden(5, 2, nn.relu),
    "dfa_output": lambda: RandomDenseLinearDFAOutput(5),
}


@pytest.mark.parametrize("backprop", [False, True], ids=["rule", "exact_backprop"])
@pytest.mark.parametrize("shape", [(6, 4), (2, 3, 4)], ids=["2d", "3d"])
@pytest.mark.parametrize("name", list(FORWARD_LAYERS))
def test_forward_equals_dense(name, shape, backprop):
    layer = FORWARD_LAYERS[name]()
    x = jnp.asarray(np.random.default_rng(15).normal(size=shape))
    variables = randomize(abstract_init(layer, x), 16)
    kernel = variables["params"]["kernel"]
    bias = variables["params"]["bias"]
    assert kernel.shape == (4, 5) and bias.shape == (5,)
    dense_out = nn.Dense(5).apply({"params": {"kernel": kernel, "bias": bias}}, x)
    activation = getattr(layer, "activation", None)
    if name.startswith("dfa_hidden"):
        dense_out = activation(dense_out)
    # independent NumPy forward too
    np_out = np.asarray(x) @ np.asarray(kernel) + np.asarray(bias)
    if name == "dfa_hidden_tanh":
        np_out = np.tanh(np_out)
    elif name == "dfa_hidden_relu":
        np_out = np.maximum(np_out, 0)
    if backprop:
        with bioflax.exact_backprop():
            out = layer.apply(variables, x)
    else:
        out = layer.apply(variables, x)
    assert out.shape == shape[:-1] + (5,)
    assert out.dtype == jnp.float64
    assert_close(out, np.asarray(dense_out), "vs nn.Dense")
    assert_close(out, np_out, "vs numpy")


def test_variable_layout():
    x = jnp.ones((2, 4))
    key = jax.random.key(0)
    fa = RandomDenseLinearFA(5).init(key, x)
    assert set(fa) == {"params", "feedback"}
    assert set(fa["params"]) == {"kernel", "bias"}
    assert fa["feedback"]["feedback_kernel"].shape == (4, 5)
    kp = RandomDenseLinearKP(5).init(key, x)
    assert set(kp) == {"params"}
    assert set(kp["params"]) == {"kernel", "bias", "feedback_kernel"}
    assert kp["params"]["feedback_kernel"].shape == (4, 5)
    interp = RandomDenseLinearInterpolateFABP(5, interpolation_factor=0.5).init(key, x)
    assert interp["feedback"]["feedback_kernel"].shape == (4, 5)
    dfa = RandomDenseLinearDFAHidden(5, 3, jnp.tanh).init(key, x)
    assert dfa["feedback"]["feedback_kernel"].shape == (5, 3)
    # B is drawn independently of W
    assert not np.allclose(fa["params"]["kernel"], fa["feedback"]["feedback_kernel"])
    assert not np.allclose(kp["params"]["kernel"], kp["params"]["feedback_kernel"])


def test_use_bias_false_forward_and_grads():
    x = np.random.default_rng(17).normal(size=(3, 4))
    layer = RandomDenseLinearFA(2, use_bias=False)
    variables = randomize(abstract_init(layer, jnp.asarray(x)), 18)
    assert set(variables["params"]) == {"kernel"}
    w = np.asarray(variables["params"]["kernel"])
    assert_close(layer.apply(variables, jnp.asarray(x)), x @ w, "forward")
    r = np.random.default_rng(19).normal(size=(3, 2))
    grads, g_x = _single_layer_grads(layer, variables, x, r)
    assert set(grads["params"]) == {"kernel"}
    assert_close(grads["params"]["kernel"], x.T @ r, "dW")
    assert_close(g_x, r @ np.asarray(variables["feedback"]["feedback_kernel"]).T, "dx")


# =========================================================================================
# 6. DFA width check; exact_backprop gives true backprop for every rule
# =========================================================================================


def test_dfa_hidden_needs_final_output_dim_but_no_width():
    with pytest.raises(ValueError, match="final_output_dim"):
        abstract_init(RandomDenseLinearDFAHidden(4), jnp.ones((1, 4)))
    # any width, narrower than the outputs included (its training: test_models.py)
    abstract_init(RandomDenseLinearDFAHidden(2, 3, nn.relu), jnp.ones((1, 4)))
    abstract_init(RandomDenseLinearDFAHidden(3, 3, nn.relu), jnp.ones((1, 4)))


@pytest.mark.parametrize("net_name", list(NETWORKS))
@pytest.mark.parametrize("network_rule", list(RULES))
def test_exact_backprop_gives_true_gradients(network_rule, net_name):
    net = NETWORKS[net_name]
    model, variables, names, x, t = build_bio(network_rule, net, seed=19)
    kp = network_rule == "kp"
    kernels, biases, feedbacks = numpy_params(variables, names, kp)
    x_flat = x.reshape(x.shape[0], -1)
    _, _, (d_w, d_b, _, dx) = np_reference("bp", x_flat, kernels, biases, feedbacks,
                                           net["acts"], t, net["loss"])

    with bioflax.exact_backprop():
        _, _, grads, g_x = jax_grads(model, variables, x, t, net["loss"])
    for index, name in enumerate(names):
        assert_close(grads["params"][name]["kernel"], d_w[index], f"dW {name}")
        assert_close(grads["params"][name]["bias"], d_b[index], f"db {name}")
    assert_close(g_x.reshape(dx.shape), dx, "dx")

    # leaving the block restores the rule (for every non-BP rule the gradients differ)
    _, _, after, _ = jax_grads(model, variables, x, t, net["loss"])
    if network_rule != "bp":
        assert not np.allclose(after["params"]["layer_0"]["kernel"], d_w[0], rtol=1e-3)


def test_exact_backprop_inside_jit_and_nesting():
    net = NETWORKS["mse_tanh_sigmoid_relu"]
    model, variables, names, x, t = build_bio("fa", net, seed=20)
    kernels, biases, feedbacks = numpy_params(variables, names, kp=False)
    _, _, bp_ref = np_reference("bp", x, kernels, biases, feedbacks, net["acts"], t, "mse")
    _, _, fa_ref = np_reference("fa", x, kernels, biases, feedbacks, net["acts"], t, "mse")

    def loss_fn(v):
        return jax_loss("mse", model.apply(v, jnp.asarray(x)), t)

    @jax.jit
    def both(v):
        rule = jax.grad(loss_fn)(v)
        with bioflax.exact_backprop():
            with bioflax.exact_backprop():
                pass
            # the inner block must not switch the outer one off
            reference = jax.grad(loss_fn)(v)
        return rule, reference

    rule, reference = both(variables)
    for index, name in enumerate(names):
        assert_close(rule["params"][name]["kernel"], fa_ref[0][index], f"FA dW {name}")
        assert_close(reference["params"][name]["kernel"], bp_ref[0][index], f"BP dW {name}")
    assert not bioflax.layers.backprop_is_forced()


def test_rule_dense_takes_a_rule_name_and_dfa():
    rng = np.random.default_rng(31)
    x = jnp.asarray(rng.normal(size=(4, 3)))
    r = jnp.asarray(rng.normal(size=(4, 2)))

    def grads(model):
        variables = model.init(jax.random.key(0), x)
        return jax.grad(lambda p: jnp.sum(model.apply({**variables, "params": p}, x) * r))(
            variables["params"])

    by_name = grads(bioflax.RuleDense(2, "usf"))
    by_rule = grads(bioflax.RuleDense(2, bioflax.rules.UniformSignSymmetry()))
    assert jax.tree.all(jax.tree.map(np.array_equal, by_name, by_rule))

    class Named(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = RandomDenseLinearDFAHidden(5, 2, jnp.tanh, name="hidden")(x)
            return RandomDenseLinearDFAOutput(2, name="out")(x)

    class ByRuleDense(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = bioflax.RuleDense(5, "dfa", activation=jnp.tanh, final_output_dim=2,
                                  name="hidden")(x)
            return bioflax.RuleDense(2, "dfa", name="out")(x)

    named, by_rule_dense = grads(Named()), grads(ByRuleDense())
    assert jax.tree.all(jax.tree.map(np.array_equal, named, by_rule_dense))
    assert float(jnp.abs(named["hidden"]["kernel"]).sum()) > 0
