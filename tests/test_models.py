"""Tests of bioflax.models: BioNeuralNetwork's structure and errors, TeacherNetwork's forward.

Expected values come from float64 NumPy forward passes written here. 64-bit floats are
enabled only inside each test (``jax.enable_x64`` context in an autouse fixture).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bioflax import BioNeuralNetwork
from bioflax.experiment.datasets import TeacherNetwork
from bioflax.models import ACTIVATIONS
from bioflax.rules import RULES
from float64 import ATOL, RTOL, abstract_init, float64_only, randomize  # noqa: F401
from numpy_reference import NP_ACTIVATIONS, np_forward


FEEDBACK_RNGS = {"feedback": jax.random.key(7)}  # brSF redraws its B from this stream


def np_mlp(x, layers, activations, output_activation="identity"):
    """``layers`` = [(W, b), ...]; ``activations[i]`` after hidden layer i."""
    _, pre = np_forward(x.reshape(x.shape[0], -1), *zip(*layers), activations)
    return NP_ACTIVATIONS[output_activation][0](pre[-1])


def layers_of(params, names):
    return [(np.asarray(params[n]["kernel"]), np.asarray(params[n]["bias"])) for n in names]


HIDDEN = (6, 5, 4)
ACTS = ("tanh", "sigmoid", "relu")
N_OUT = 3


def _init(rule, x, **kwargs):
    model = BioNeuralNetwork(HIDDEN, ACTS, N_OUT, rule=rule, **kwargs)
    return model, abstract_init(model, jnp.asarray(x))


# --- parameter trees ------------------------------------------------------------------


def test_kernel_and_bias_tree_identical_across_modes():
    x = np.ones((2, 7))

    def kernel_bias_tree(variables):
        return {layer: {k: v.shape for k, v in leaves.items() if k in ("kernel", "bias")}
                for layer, leaves in variables["params"].items()}

    _, reference = _init("bp", x)
    expected = {
        "layer_0": {"kernel": (7, 6), "bias": (6,)},
        "layer_1": {"kernel": (6, 5), "bias": (5,)},
        "layer_2": {"kernel": (5, 4), "bias": (4,)},
        "layer_3": {"kernel": (4, 3), "bias": (3,)},
    }
    assert kernel_bias_tree(reference) == expected
    assert set(RULES) == {"bp", "fa", "kp", "dfa", "drtp", "interpolate_fa_bp", "usf", "frsf",
                          "brsf"}
    for rule in RULES:
        _, variables = _init(rule, x)
        assert kernel_bias_tree(variables) == expected, rule
        # and nothing else in 'params' but KP's feedback kernels
        for layer, leaves in variables["params"].items():
            extra = set(leaves) - {"kernel", "bias"}
            assert extra == ({"feedback_kernel"} if rule == "kp" else set()), (rule, layer)


def test_feedback_variables_per_mode():
    x = np.ones((2, 7))
    _, bp = _init("bp", x)
    assert set(bp) == {"params"}
    _, kp = _init("kp", x)
    assert set(kp) == {"params"}
    for rule in ("fa", "interpolate_fa_bp"):
        _, v = _init(rule, x)
        assert {k: leaf["feedback_kernel"].shape for k, leaf in v["feedback"].items()} == {
            "layer_0": (7, 6), "layer_1": (6, 5), "layer_2": (5, 4), "layer_3": (4, 3)}
    _, dfa = _init("dfa", x)
    # DFA: B of every hidden layer maps the outputs to the layer; the output layer has none
    assert {k: leaf["feedback_kernel"].shape for k, leaf in dfa["feedback"].items()} == {
        "layer_0": (6, 3), "layer_1": (5, 3), "layer_2": (4, 3)}


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("hidden", [HIDDEN, ()])
def test_input_layer_kernel_init_sets_only_the_first_layers_w(rule, hidden):
    model = BioNeuralNetwork(hidden, ACTS[:len(hidden)], N_OUT, rule=rule,
                             kernel_init=jax.nn.initializers.zeros,
                             input_layer_kernel_init=jax.nn.initializers.ones)
    params = model.init(jax.random.PRNGKey(0), jnp.ones((2, 7)))["params"]
    kernels = [np.asarray(params[f"layer_{i}"]["kernel"]) for i in range(len(hidden) + 1)]
    assert kernels[0].shape[0] == 7 and np.all(kernels[0] == 1.0)
    assert all(np.all(kernel == 0.0) for kernel in kernels[1:])


def test_no_hidden_layers_is_a_linear_model():
    x = np.random.default_rng(0).normal(size=(4, 5))
    for rule in RULES:
        model = BioNeuralNetwork((), (), 2, rule=rule)
        variables = randomize(abstract_init(model, jnp.asarray(x)), 1)
        assert set(variables["params"]) == {"layer_0"}
        (kernel, bias), = layers_of(variables["params"], ["layer_0"])
        out = model.apply(variables, jnp.asarray(x), rngs=FEEDBACK_RNGS)  # brSF draws B
        np.testing.assert_allclose(out, x @ kernel + bias,
                                   rtol=RTOL, atol=ATOL)


# --- forward pass ---------------------------------------------------------------------


def test_forward_matches_numpy_in_every_mode_with_shared_weights():
    """Every rule keeps the forward pass: same kernels/biases -> same output as NumPy."""
    x = np.random.default_rng(1).normal(size=(5, 7))
    _, reference = _init("bp", x)
    params = randomize(reference, 2)["params"]
    names = [f"layer_{i}" for i in range(4)]
    expected = np_mlp(x, layers_of(params, names), ACTS)
    for rule in RULES:
        model, variables = _init(rule, x)
        variables = randomize(variables, 3)  # fresh feedback matrices
        for name in names:  # ... with the shared kernels and biases
            variables["params"][name]["kernel"] = params[name]["kernel"]
            variables["params"][name]["bias"] = params[name]["bias"]
        out = model.apply(variables, jnp.asarray(x), rngs=FEEDBACK_RNGS)
        assert out.shape == (5, N_OUT)
        np.testing.assert_allclose(out, expected, rtol=RTOL, atol=ATOL, err_msg=rule)


@pytest.mark.parametrize("rule", ["bp", "fa", "dfa"])
def test_image_shaped_input_is_flattened(rule):
    rng = np.random.default_rng(4)
    images = rng.normal(size=(3, 2, 3, 2))  # batch of 2x3 images with 2 channels
    model, variables = _init(rule, images)
    assert variables["params"]["layer_0"]["kernel"].shape == (12, HIDDEN[0])
    variables = randomize(variables, 5)
    out = model.apply(variables, jnp.asarray(images))
    flat = model.apply(variables, jnp.asarray(images.reshape(3, 12)))
    np.testing.assert_array_equal(out, flat)
    names = [f"layer_{i}" for i in range(4)]
    np.testing.assert_allclose(out, np_mlp(images, layers_of(variables["params"], names), ACTS),
                               rtol=RTOL, atol=ATOL)
    # gradients w.r.t. an image come back in the image's shape
    grad = jax.grad(lambda im: jnp.sum(model.apply(variables, im) ** 2))(jnp.asarray(images))
    assert grad.shape == images.shape


def test_activations_follow_their_hidden_layer_and_output_is_linear():
    # identity/relu order matters: relu after layer 0 zeroes negative pre-activations.
    x = np.random.default_rng(6).normal(size=(8, 3))
    model = BioNeuralNetwork((4, 4), ("relu", "identity"), 2, rule="fa")
    variables = randomize(abstract_init(model, jnp.asarray(x)), 7)
    names = ["layer_0", "layer_1", "layer_2"]
    layers = layers_of(variables["params"], names)
    out = np.asarray(model.apply(variables, jnp.asarray(x)))
    np.testing.assert_allclose(out, np_mlp(x, layers, ("relu", "identity")), rtol=RTOL,
                               atol=ATOL)
    assert not np.allclose(out, np_mlp(x, layers, ("identity", "relu")))
    assert (out < 0).any()  # the output layer is linear (no relu on the output)


# --- errors ---------------------------------------------------------------------------


def test_unknown_rule_raises_with_choices():
    model = BioNeuralNetwork((4,), ("relu",), 2, rule="feedback_alignment")
    with pytest.raises(ValueError) as info:
        abstract_init(model, jnp.ones((1, 3)))
    message = str(info.value)
    assert "feedback_alignment" in message
    for rule in RULES:
        assert rule in message


def test_unknown_activation_raises_with_choices():
    model = BioNeuralNetwork((4, 4), ("relu", "swishy"), 2, rule="fa")
    with pytest.raises(ValueError) as info:
        abstract_init(model, jnp.ones((1, 3)))
    message = str(info.value)
    assert "swishy" in message and "tanh" in message and "sigmoid" in message
    with pytest.raises(ValueError, match="swishy"):
        abstract_init(TeacherNetwork((3,), 2, activation="swishy"), jnp.ones((1, 3)))


@pytest.mark.parametrize("rule", RULES)
def test_mismatched_lengths_raise(rule):
    model = BioNeuralNetwork((4, 4), ("relu",), 2, rule=rule)
    with pytest.raises(ValueError, match="same length") as info:
        abstract_init(model, jnp.ones((1, 3)))
    assert "(4, 4)" in str(info.value) and "relu" in str(info.value)


def test_dfa_hidden_narrower_than_outputs_trains_by_dfa():
    # a hidden layer of width 2 under 3 outputs: each hidden δ_l = φ'(a_l) ⊙ (e B_lᵀ)
    model = BioNeuralNetwork((8, 2), ("relu", "tanh"), 3, rule="dfa")
    x = np.random.default_rng(3).normal(size=(5, 3))
    variables = randomize(abstract_init(model, jnp.asarray(x)), 4)
    params, fixed = variables["params"], variables["feedback"]
    assert fixed["layer_1"]["feedback_kernel"].shape == (2, 3)
    # L = Σ y ⊙ R, so e = R
    r = np.random.default_rng(5).normal(size=(5, 3))
    grads = jax.grad(lambda p: jnp.sum(model.apply({"params": p, "feedback": fixed},
                                                   jnp.asarray(x)) * r))(params)
    k = [np.asarray(params[f"layer_{i}"]["kernel"]) for i in range(3)]
    b = [np.asarray(params[f"layer_{i}"]["bias"]) for i in range(3)]
    a0 = x @ k[0] + b[0]
    h0 = np.maximum(a0, 0)
    a1 = h0 @ k[1] + b[1]
    h1 = np.tanh(a1)
    delta0 = (a0 > 0) * (r @ np.asarray(fixed["layer_0"]["feedback_kernel"]).T)
    delta1 = (1 - np.tanh(a1) ** 2) * (r @ np.asarray(fixed["layer_1"]["feedback_kernel"]).T)
    for index, (inputs, delta) in enumerate([(x, delta0), (h0, delta1), (h1, r)]):
        np.testing.assert_allclose(grads[f"layer_{index}"]["kernel"], inputs.T @ delta,
                                   rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(grads[f"layer_{index}"]["bias"], delta.sum(0),
                                   rtol=RTOL, atol=ATOL)
    # the same widths are fine for the other rules
    abstract_init(BioNeuralNetwork((8, 2), ("relu", "tanh"), 3, rule="fa"), jnp.ones((1, 3)))


def test_interpolation_factor_out_of_range_raises():
    model = BioNeuralNetwork((4,), ("relu",), 2, rule="interpolate_fa_bp",
                             interpolation_factor=1.2)
    with pytest.raises(ValueError, match="interpolation_factor"):
        abstract_init(model, jnp.ones((1, 3)))


def test_activation_registry_contains_the_documented_names():
    for name in ("relu", "tanh", "sigmoid", "identity"):
        assert name in ACTIVATIONS
    a = np.linspace(-2, 2, 9)
    for name, (fn, _) in NP_ACTIVATIONS.items():
        np.testing.assert_allclose(ACTIVATIONS[name](jnp.asarray(a)), fn(a), rtol=1e-12,
                                   atol=1e-12)


# --- teacher ----------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["identity", "tanh", "sigmoid"])
def test_teacher_forward_matches_numpy(activation):
    rng = np.random.default_rng(8)
    x = rng.normal(size=(6, 2, 2))  # also flattened
    teacher = TeacherNetwork((5, 4), 3, activation=activation)
    variables = randomize(abstract_init(teacher, jnp.asarray(x)), 9)
    params = variables["params"]
    names = sorted(params, key=lambda n: int(n.rsplit("_", 1)[-1]))
    assert [params[n]["kernel"].shape for n in names] == [(4, 5), (5, 4), (4, 3)]
    # the teacher applies its activation after EVERY layer, the output layer included
    expected = np_mlp(x, layers_of(params, names), (activation,) * 2,
                      output_activation=activation)
    out = teacher.apply(variables, jnp.asarray(x))
    assert out.shape == (6, 3)
    np.testing.assert_allclose(out, expected, rtol=RTOL, atol=ATOL)
    if activation == "sigmoid":
        assert np.all((np.asarray(out) > 0) & (np.asarray(out) < 1))


def test_linear_teacher_is_an_affine_map():
    # identity teacher: y = T x + c with T = W1 W2 W3 and c from the biases
    rng = np.random.default_rng(10)
    x = rng.normal(size=(7, 4))
    teacher = TeacherNetwork((5, 6), 2)
    variables = randomize(abstract_init(teacher, jnp.asarray(x)), 11)
    params = variables["params"]
    names = sorted(params, key=lambda n: int(n.rsplit("_", 1)[-1]))
    (w1, b1), (w2, b2), (w3, b3) = layers_of(params, names)
    t_matrix = w1 @ w2 @ w3
    c = (b1 @ w2 + b2) @ w3 + b3
    np.testing.assert_allclose(teacher.apply(variables, jnp.asarray(x)), x @ t_matrix + c,
                               rtol=RTOL, atol=ATOL)


def test_mode_is_the_deprecated_name_of_rule():
    x = jnp.ones((2, 3))
    old = BioNeuralNetwork((4,), ("tanh",), 2, mode="fa")
    with pytest.warns(DeprecationWarning, match="rule="):
        variables = old.init(jax.random.key(0), x)
    assert "feedback" in variables  # FA's fixed B, not backprop's nothing
    new = BioNeuralNetwork((4,), ("tanh",), 2, rule="fa")
    np.testing.assert_array_equal(new.apply(variables, x), old.apply(variables, x))
