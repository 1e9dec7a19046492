"""Tests of ``bioflax.convert`` and the conv rules against hand-derived float64 references.

The references are NumPy loops written from the definitions (README's rule table):
a convolution as a sum over kernel offsets of strided, dilated input windows, its
input-gradient as the scatter of ``δ Bᵀ`` back into those windows, and its kernel gradient
as ``Σ windowᵀ δ``; pooling, ReLU and BatchNorm backward passes written out by hand. JAX's
autodiff only differentiates the code under test.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import bioflax
from bioflax import alignment as alignment_lib
from bioflax import convert, rules
from float64 import ATOL, RTOL, float64_only  # noqa: F401
from numpy_reference import np_cosine

SIGN_RULES = ("usf", "frsf")
KERNEL_RULES = ("bp", "fa", "kp", "interpolate_fa_bp") + SIGN_RULES


# =========================================================================================
# NumPy references
# =========================================================================================


def same_pads(size, k, stride, dilation):
    """lax's 'SAME': output ceil(size/stride), the padding split low = total // 2."""
    effective = (k - 1) * dilation + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + effective - size, 0)
    return total // 2, total - total // 2


class NpConv:
    """``y[n, p, q, o] = Σ_{i, j, c} x_pad[n, p·s + i·d, q·s + j·d, c] W[i, j, c, o]`` within
    each channel group."""

    def __init__(self, x_shape, kernel_shape, strides, padding, dilation, groups):
        _, height, width, _ = x_shape
        kh, kw, _, _ = kernel_shape
        if padding == "SAME":
            pads = (same_pads(height, kh, strides[0], dilation[0]),
                    same_pads(width, kw, strides[1], dilation[1]))
        elif padding == "VALID":
            pads = ((0, 0), (0, 0))
        else:
            pads = padding
        self.x_shape, self.kernel_shape = x_shape, kernel_shape
        self.strides, self.pads, self.dilation, self.groups = strides, pads, dilation, groups
        padded = (height + sum(pads[0]), width + sum(pads[1]))
        self.out_hw = tuple((padded[a] - ((kernel_shape[a] - 1) * dilation[a] + 1))
                            // strides[a] + 1 for a in range(2))

    def _windows(self):
        """(i, j, group, input-window slices, input channels, output channels)."""
        kh, kw, c_in, c_out = self.kernel_shape
        out_group = c_out // self.groups
        for i in range(kh):
            for j in range(kw):
                rows = slice(i * self.dilation[0],
                             i * self.dilation[0] + self.strides[0] * (self.out_hw[0] - 1) + 1,
                             self.strides[0])
                cols = slice(j * self.dilation[1],
                             j * self.dilation[1] + self.strides[1] * (self.out_hw[1] - 1) + 1,
                             self.strides[1])
                for g in range(self.groups):
                    yield (i, j, rows, cols, slice(g * c_in, (g + 1) * c_in),
                           slice(g * out_group, (g + 1) * out_group))

    def _pad(self, x):
        return np.pad(x, ((0, 0), self.pads[0], self.pads[1], (0, 0)))

    def forward(self, x, kernel):
        y = np.zeros((x.shape[0], *self.out_hw, kernel.shape[-1]))
        xp = self._pad(x)
        for i, j, rows, cols, c_in, c_out in self._windows():
            y[..., c_out] += xp[:, rows, cols, c_in] @ kernel[i, j][:, c_out]
        return y

    def input_grad(self, delta, backward_kernel):
        """The signal to the layer below: ``δ Bᵀ`` scattered back into every window."""
        xp = np.zeros(self._pad(np.zeros(self.x_shape)).shape)
        for i, j, rows, cols, c_in, c_out in self._windows():
            xp[:, rows, cols, c_in] += delta[..., c_out] @ backward_kernel[i, j][:, c_out].T
        height, width = self.x_shape[1:3]
        return xp[:, self.pads[0][0]:self.pads[0][0] + height,
                  self.pads[1][0]:self.pads[1][0] + width]

    def kernel_grad(self, x, delta):
        d_kernel = np.zeros(self.kernel_shape)
        xp = self._pad(x)
        for i, j, rows, cols, c_in, c_out in self._windows():
            d_kernel[i, j][:, c_out] += np.einsum("nhwc,nhwo->co", xp[:, rows, cols, c_in],
                                                  delta[..., c_out])
        return d_kernel


def np_backward_kernel(rule, kernel, stored, lam=0.3):
    """``B`` of README's rule table from the kernel and the rule's stored matrix."""
    return {
        "bp": lambda: kernel,
        "fa": lambda: stored,
        "kp": lambda: stored,
        "interpolate_fa_bp": lambda: lam * stored + (1 - lam) * kernel,
        "usf": lambda: np.sign(kernel) / math.sqrt(np.prod(kernel.shape[:-1])),
        "frsf": lambda: np.abs(stored) * np.sign(kernel),
    }[rule]()


def rule_options(rule, lam=0.3):
    return {"interpolation_factor": lam} if rule == "interpolate_fa_bp" else {}


def stored_matrix(variables, path, rule):
    """The matrix a rule keeps for the layer at ``path`` (None for bp/uSF)."""
    name = {"kp": "feedback_kernel", "frsf": "feedback_magnitude"}.get(rule, "feedback_kernel")
    collection = variables["params"] if rule == "kp" else variables.get("feedback", {})
    for key in path:
        collection = collection.get(key, {})
    value = collection.get(name)
    return None if value is None else np.asarray(value)


def layer_matrices(variables, rule):
    """The rule's matrix of each layer of the test networks (Conv_0, Conv_1, Dense_0): for
    DFA the ``output_feedback`` at the inputs of Conv_1 and Dense_0 (the first layer has
    none), else the stored matrix of :func:`stored_matrix` (None for bp/uSF)."""
    if rule == "dfa":
        return {name: np.asarray(variables["feedback"][name]["output_feedback"])
                for name in ("Conv_1", "Dense_0")}
    return {name: stored_matrix(variables, (name,), rule)
            for name in ("Conv_0", "Conv_1", "Dense_0")}


def randomized(variables, seed):
    """Every variable redrawn in float64 (kernels ~ N(0, 1/fan_in), the rest N(0, 0.25))."""
    rng = np.random.default_rng(seed)

    def draw(leaf):
        scale = 1 / math.sqrt(math.prod(leaf.shape[:-1])) if leaf.ndim >= 2 else 0.5
        return jnp.asarray(scale * rng.normal(size=leaf.shape))

    return jax.tree.map(draw, variables)


def close(got, want, what):
    np.testing.assert_allclose(np.asarray(got), want, rtol=RTOL, atol=ATOL, err_msg=what)


# =========================================================================================
# 1. One converted nn.Conv, every kernel rule, every conv setting
# =========================================================================================

CONV_SETTINGS = {
    "stride2_same": dict(kernel_size=(3, 3), strides=2, padding="SAME"),
    "valid_dilated": dict(kernel_size=(3, 2), padding="VALID", kernel_dilation=2),
    "groups_same": dict(kernel_size=(2, 3), padding="SAME", feature_group_count=2),
    "explicit_pad_stride_no_bias": dict(kernel_size=(3, 3), strides=(2, 1),
                                        padding=((1, 2), (0, 1)), use_bias=False),
}


def conv_reference_setting(setting, x_shape, features):
    kernel_size = setting["kernel_size"]
    strides = setting.get("strides", 1)
    strides = (strides, strides) if isinstance(strides, int) else strides
    dilation = setting.get("kernel_dilation", 1)
    groups = setting.get("feature_group_count", 1)
    kernel_shape = (*kernel_size, x_shape[-1] // groups, features)
    return NpConv(x_shape, kernel_shape, strides, setting["padding"], (dilation, dilation),
                  groups)


@pytest.mark.parametrize("rule", KERNEL_RULES)
@pytest.mark.parametrize("setting", CONV_SETTINGS)
def test_converted_conv_matches_hand_derived_reference(rule, setting):
    x_shape, features = (2, 7, 6, 4), 6
    layer = nn.Conv(features, **CONV_SETTINGS[setting])
    model = convert(layer, rule, **rule_options(rule))
    rng = np.random.default_rng(0)
    x = rng.normal(size=x_shape)
    variables = randomized(model.init(jax.random.key(0), jnp.asarray(x)), 1)
    reference = conv_reference_setting(CONV_SETTINGS[setting], x_shape, features)
    kernel = np.asarray(variables["params"]["kernel"])
    y_ref = reference.forward(x, kernel)
    if "bias" in variables["params"]:
        y_ref = y_ref + np.asarray(variables["params"]["bias"])
    r = rng.normal(size=y_ref.shape)  # L = Σ y ⊙ r, so δ = r

    def loss(params, inputs):
        y = model.apply({**variables, "params": params}, inputs)
        return jnp.sum(y * r), y

    (_, y), (grads, g_x) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        variables["params"], jnp.asarray(x))
    close(y, y_ref, "forward")
    backward = np_backward_kernel(rule, kernel, stored_matrix(variables, (), rule))
    close(g_x, reference.input_grad(r, backward), "signal to the layer below")
    close(grads["kernel"], reference.kernel_grad(x, r), "dW")
    if "bias" in variables["params"]:
        close(grads["bias"], r.sum(axis=(0, 1, 2)), "db")
    if rule == "kp":
        close(grads["feedback_kernel"], reference.kernel_grad(x, r), "KP: dB = dW")


@pytest.mark.parametrize("layer, shape, conv_impl, bitwise", [
    (nn.Dense(5), (3, 4), "xla", True),
    # the default: XLA's convolution, nn.Conv's own: bit for bit
    (nn.Conv(5, (3, 3), strides=2), (3, 9, 9, 2), "xla", True),
    # the layer's own convolution is kept, whatever conv_impl says: bit for bit
    (nn.Conv(5, (3, 3), strides=2, conv_general_dilated=jax.lax.conv_general_dilated),
     (3, 9, 9, 2), "banded", True),
    # banded matmuls: equal up to float rounding
    (nn.Conv(5, (3, 3), strides=2), (3, 9, 9, 2), "banded", False),
])
def test_converted_forward_equals_the_original_layer(layer, shape, conv_impl, bitwise):
    with jax.enable_x64(False):
        x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
        variables = layer.init(jax.random.key(0), x)
        expected = np.asarray(layer.apply(variables, x))
        for rule in rules.RULES:
            model = convert(layer, rule, conv_impl=conv_impl)
            converted_vars = model.init(jax.random.key(0), x)
            # the same initial kernel and bias, under the same names
            for name, value in variables["params"].items():
                assert np.array_equal(converted_vars["params"][name], value), (rule, name)
            out = np.asarray(model.apply(converted_vars, x, rngs={"feedback": jax.random.key(1)}))
            if bitwise:
                assert np.array_equal(out, expected), rule
            else:
                np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6, err_msg=rule)


# =========================================================================================
# 2. brSF: a new |M| every step, the same for the same key, the signs of W
# =========================================================================================


def brsf_backward_matrix(model, variables, key):
    """``B`` read off the input gradient: with ``δ = I``, a Dense layer sends ``δ Bᵀ = Bᵀ``."""
    n_out = variables["params"]["kernel"].shape[1]

    def forward(x):
        return model.apply(variables, x, rngs={"feedback": key})

    x = jnp.zeros((n_out, variables["params"]["kernel"].shape[0]))
    _, vjp = jax.vjp(forward, x)
    return np.asarray(vjp(jnp.eye(n_out))[0]).T


def test_brsf_draws_a_new_matrix_each_step_with_the_signs_of_w():
    model = convert(nn.Dense(40), "brsf")
    variables = model.init(jax.random.key(0), jnp.zeros((1, 60)))
    kernel = np.asarray(variables["params"]["kernel"])
    first = brsf_backward_matrix(model, variables, jax.random.key(1))
    again = brsf_backward_matrix(model, variables, jax.random.key(1))
    second = brsf_backward_matrix(model, variables, jax.random.key(2))
    assert np.array_equal(first, again)
    assert not np.allclose(np.abs(first), np.abs(second))
    for b in (first, second):
        assert np.array_equal(np.sign(b), np.sign(kernel))
        # |M| with M ~ LeCun normal: E|M| = √(2/π) / √fan_in, 2400 draws
        assert abs(np.abs(b).mean() * math.sqrt(60) - math.sqrt(2 / math.pi)) < 0.05


def test_brsf_without_a_feedback_rng_says_what_to_pass():
    model = convert(nn.Dense(3), "brsf")
    variables = model.init(jax.random.key(0), jnp.zeros((1, 4)))
    with pytest.raises(ValueError, match="rngs=\\{'feedback': key\\}"):
        model.apply(variables, jnp.zeros((1, 4)))


# =========================================================================================
# 3. Whole networks a Flax user would write, against hand-built backward passes
# =========================================================================================


class SmallCNN(nn.Module):
    """conv 3×3 → ReLU → avg-pool 2 → conv 3×3 stride 2 (VALID) → ReLU → flatten → dense."""

    @nn.compact
    def __call__(self, x):
        x = nn.avg_pool(nn.relu(nn.Conv(4, (3, 3))(x)), (2, 2), (2, 2))
        x = nn.relu(nn.Conv(5, (3, 3), strides=2, padding="VALID")(x))
        return nn.Dense(3)(x.reshape((x.shape[0], -1)))


def np_avg_pool_backward(d_out):
    """2×2, stride 2: every input of a window receives a quarter of its output's δ."""
    return np.repeat(np.repeat(d_out, 2, axis=1), 2, axis=2) / 4


def np_avg_pool(x):
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def cnn_reference(rule, params, feedback, x, error):
    """Gradients of SmallCNN under ``rule`` (``error`` = ∂L/∂output), by hand.

    ``feedback[name]`` is the layer's stored matrix; for DFA, its ``output_feedback``.
    """
    conv0 = NpConv(x.shape, params["Conv_0"]["kernel"].shape, (1, 1), "SAME", (1, 1), 1)
    a0 = conv0.forward(x, params["Conv_0"]["kernel"]) + params["Conv_0"]["bias"]
    h0 = np_avg_pool(np.maximum(a0, 0))
    conv1 = NpConv(h0.shape, params["Conv_1"]["kernel"].shape, (2, 2), "VALID", (1, 1), 1)
    a1 = conv1.forward(h0, params["Conv_1"]["kernel"]) + params["Conv_1"]["bias"]
    h1 = np.maximum(a1, 0).reshape(len(x), -1)
    grads = {"Dense_0": {"kernel": h1.T @ error, "bias": error.sum(0)}}
    if rule == "dfa":
        d_h1 = error @ feedback["Dense_0"].T
    else:
        kernel = params["Dense_0"]["kernel"]
        d_h1 = error @ np_backward_kernel(rule, kernel, feedback.get("Dense_0")).T
    delta1 = d_h1.reshape(a1.shape) * (a1 > 0)
    grads["Conv_1"] = {"kernel": conv1.kernel_grad(h0, delta1), "bias": delta1.sum((0, 1, 2))}
    if rule == "dfa":
        d_h0 = (error @ feedback["Conv_1"].T).reshape(h0.shape)
    else:
        kernel = params["Conv_1"]["kernel"]
        d_h0 = conv1.input_grad(delta1, np_backward_kernel(rule, kernel, feedback.get("Conv_1")))
    delta0 = np_avg_pool_backward(d_h0) * (a0 > 0)
    grads["Conv_0"] = {"kernel": conv0.kernel_grad(x, delta0), "bias": delta0.sum((0, 1, 2))}
    d_x = None if rule == "dfa" else conv0.input_grad(
        delta0, np_backward_kernel(rule, params["Conv_0"]["kernel"], feedback.get("Conv_0")))
    return grads, d_x


def softmax_xent_and_error(y, labels):
    """Mean softmax cross-entropy and its gradient ``(softmax(y) − onehot) / batch``."""
    p = np.exp(y - y.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    onehot = np.eye(y.shape[1])[labels]
    return (p - onehot) / len(y)


def converted_grads(model, variables, x, labels, **apply_kwargs):
    def loss(params, inputs):
        out = model.apply({**variables, "params": params}, inputs, **apply_kwargs)
        y = out[0] if isinstance(out, tuple) else out
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(y), labels[:, None], 1)), y

    (_, y), (grads, g_x) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        variables["params"], jnp.asarray(x))
    return np.asarray(y), grads, g_x


@pytest.mark.parametrize("rule", KERNEL_RULES + ("dfa",))
def test_converted_cnn_matches_hand_built_network(rule):
    rng = np.random.default_rng(3)
    x, labels = rng.normal(size=(3, 8, 8, 2)), jnp.asarray([0, 2, 1])
    model = convert(SmallCNN(), rule, **rule_options(rule))
    variables = randomized(model.init(jax.random.key(0), jnp.asarray(x)), 4)
    y, grads, g_x = converted_grads(model, variables, x, labels)
    params = jax.tree.map(np.asarray, variables["params"])
    if rule == "dfa":
        assert "Conv_0" not in variables["feedback"]  # the first layer's input: no B
    feedback = layer_matrices(variables, rule)
    want, d_x = cnn_reference(rule, params, feedback, x,
                              softmax_xent_and_error(y, np.asarray(labels)))
    for name, leaves in want.items():
        for leaf, value in leaves.items():
            close(grads[name][leaf], value, f"{rule}: {name}/{leaf}")
    if d_x is not None:  # the model's input receives the rule's signal (not for DFA)
        close(g_x, d_x, f"{rule}: input gradient")


class ResidualBlock(nn.Module):
    """conv → BN → ReLU → conv → BN, plus the identity shortcut, → ReLU → mean → dense."""

    @nn.compact
    def __call__(self, x, train: bool = True):
        y = nn.relu(nn.BatchNorm(use_running_average=not train)(
            nn.Conv(x.shape[-1], (3, 3), use_bias=False)(x)))
        y = nn.BatchNorm(use_running_average=not train)(
            nn.Conv(x.shape[-1], (3, 3), use_bias=False)(y))
        y = nn.relu(y + x)
        return nn.Dense(3)(y.mean(axis=(1, 2)))


def np_batchnorm(x, scale, bias, epsilon=1e-5):
    mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
    x_hat = (x - mean) / np.sqrt(var + epsilon)
    return x_hat * scale + bias, (x_hat, np.sqrt(var + epsilon))


def np_batchnorm_backward(d_y, scale, cache):
    """``dx = γ/σ (dy − mean(dy) − x̂ mean(dy x̂))``; ``dγ = Σ dy x̂``, ``dβ = Σ dy``."""
    x_hat, sigma = cache
    axes = (0, 1, 2)
    d_x = scale / sigma * (d_y - d_y.mean(axes) - x_hat * (d_y * x_hat).mean(axes))
    return d_x, (d_y * x_hat).sum(axes), d_y.sum(axes)


def residual_reference(rule, p, fb, x, error):
    """Gradients of ResidualBlock in training mode under ``rule``, by hand."""
    conv = NpConv(x.shape, p["Conv_0"]["kernel"].shape, (1, 1), "SAME", (1, 1), 1)
    bn0, bn1 = p["BatchNorm_0"], p["BatchNorm_1"]
    a0 = conv.forward(x, p["Conv_0"]["kernel"])
    n0, cache0 = np_batchnorm(a0, bn0["scale"], bn0["bias"])
    h0 = np.maximum(n0, 0)
    a1 = conv.forward(h0, p["Conv_1"]["kernel"])
    n1, cache1 = np_batchnorm(a1, bn1["scale"], bn1["bias"])
    s = n1 + x
    h1 = np.maximum(s, 0)
    pooled = h1.mean((1, 2))
    grads = {"Dense_0": {"kernel": pooled.T @ error, "bias": error.sum(0)}}
    spatial = h1.shape[1] * h1.shape[2]
    if rule == "dfa":
        d_pooled = error @ fb["Dense_0"].T
    else:
        d_pooled = error @ np_backward_kernel(rule, p["Dense_0"]["kernel"], fb.get("Dense_0")).T
    d_s = np.broadcast_to(d_pooled[:, None, None, :] / spatial, h1.shape) * (s > 0)
    d_a1, d_scale1, d_bias1 = np_batchnorm_backward(d_s, bn1["scale"], cache1)
    grads["BatchNorm_1"] = {"scale": d_scale1, "bias": d_bias1}
    grads["Conv_1"] = {"kernel": conv.kernel_grad(h0, d_a1)}
    if rule == "dfa":
        d_h0 = (error @ fb["Conv_1"].T).reshape(h0.shape)
    else:
        d_h0 = conv.input_grad(d_a1, np_backward_kernel(rule, p["Conv_1"]["kernel"],
                                                        fb.get("Conv_1")))
    d_a0, d_scale0, d_bias0 = np_batchnorm_backward(d_h0 * (n0 > 0), bn0["scale"], cache0)
    grads["BatchNorm_0"] = {"scale": d_scale0, "bias": d_bias0}
    grads["Conv_0"] = {"kernel": conv.kernel_grad(x, d_a0)}
    # the block's input: through the identity shortcut, plus Conv_0's signal (not DFA's)
    d_x = None if rule == "dfa" else d_s + conv.input_grad(
        d_a0, np_backward_kernel(rule, p["Conv_0"]["kernel"], fb.get("Conv_0")))
    return grads, d_x


@pytest.mark.parametrize("rule", KERNEL_RULES + ("dfa",))
def test_converted_residual_block_with_batchnorm_matches_hand_built_network(rule):
    rng = np.random.default_rng(5)
    x, labels = rng.normal(size=(4, 5, 5, 3)), jnp.asarray([0, 2, 1, 1])
    model = convert(ResidualBlock(), rule, **rule_options(rule))
    variables = model.init(jax.random.key(0), jnp.asarray(x))
    variables = {**variables, **randomized({k: v for k, v in variables.items()
                                            if k != "batch_stats"}, 6)}
    y, grads, g_x = converted_grads(model, variables, x, labels, mutable=["batch_stats"])
    params = jax.tree.map(np.asarray, variables["params"])
    feedback = layer_matrices(variables, rule)
    want, d_x = residual_reference(rule, params, feedback, x,
                                   softmax_xent_and_error(y, np.asarray(labels)))
    for name, leaves in want.items():
        for leaf, value in leaves.items():
            close(grads[name][leaf], value, f"{rule}: {name}/{leaf}")
    if d_x is not None:
        close(g_x, d_x, f"{rule}: input gradient")


# =========================================================================================
# 3b. DFA with a kernel shared across positions at a conv layer's input (biotorch's)
# =========================================================================================


class TwoConvs(nn.Module):
    """conv 3×3 SAME → tanh → conv (``setting``) → ReLU → flatten → dense."""

    setting: str

    @nn.compact
    def __call__(self, x):
        h0 = jnp.tanh(nn.Conv(4, (3, 3))(x))
        h1 = nn.relu(nn.Conv(5, **CONV_SETTINGS[self.setting])(h0))
        return nn.Dense(3)(h1.reshape((h1.shape[0], -1)))


@pytest.mark.parametrize("setting", [s for s in CONV_SETTINGS if s != "groups_same"])
def test_dfa_shared_kernel_sends_the_transposed_conv_of_the_repeated_error(setting):
    rng = np.random.default_rng(12)
    x, labels = rng.normal(size=(3, 7, 6, 2)), jnp.asarray([0, 2, 1])
    model = convert(TwoConvs(setting), "dfa", conv_feedback="shared_kernel")
    variables = randomized(model.init(jax.random.key(0), jnp.asarray(x)), 13)
    y, grads, _ = converted_grads(model, variables, x, labels)
    p = jax.tree.map(np.asarray, variables["params"])
    kernel_b = np.asarray(variables["feedback"]["Conv_1"]["output_feedback"])
    dense_b = np.asarray(variables["feedback"]["Dense_0"]["output_feedback"])
    error = softmax_xent_and_error(y, np.asarray(labels))

    conv0 = NpConv(x.shape, p["Conv_0"]["kernel"].shape, (1, 1), "SAME", (1, 1), 1)
    h0 = np.tanh(conv0.forward(x, p["Conv_0"]["kernel"]) + p["Conv_0"]["bias"])
    conv1 = conv_reference_setting(CONV_SETTINGS[setting], h0.shape, 5)
    a1 = conv1.forward(h0, p["Conv_1"]["kernel"]) + p["Conv_1"].get("bias", 0)
    # the dense layer's input keeps a dense B; Conv_1's input gets a (kh, kw, 4, 3) kernel
    assert kernel_b.shape == (*CONV_SETTINGS[setting]["kernel_size"], 4, 3)
    assert dense_b.shape == (a1[0].size, 3)
    delta1 = (error @ dense_b.T).reshape(a1.shape) * (a1 > 0)
    feedback = conv_reference_setting(CONV_SETTINGS[setting], h0.shape, 3)
    repeated = np.broadcast_to(error[:, None, None, :], (*a1.shape[:3], 3))
    delta0 = feedback.input_grad(repeated, kernel_b) * (1 - h0 ** 2)
    close(grads["Conv_1"]["kernel"], conv1.kernel_grad(h0, delta1), "Conv_1/kernel")
    close(grads["Conv_0"]["kernel"], conv0.kernel_grad(x, delta0), "Conv_0/kernel")
    close(grads["Conv_0"]["bias"], delta0.sum((0, 1, 2)), "Conv_0/bias")


def test_dfa_shared_kernel_refuses_grouped_convolutions_and_unknown_names():
    class Grouped(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(6, (2, 3), feature_group_count=2)(nn.Conv(4, (3, 3))(x))
            return nn.Dense(3)(x.reshape((x.shape[0], -1)))

    with pytest.raises(ValueError, match="feature_group_count=2.*conv_feedback='dense'"):
        convert(Grouped(), "dfa", conv_feedback="shared_kernel").init(
            jax.random.key(0), jnp.zeros((1, 7, 6, 2)))
    convert(Grouped(), "dfa").init(jax.random.key(0), jnp.zeros((1, 7, 6, 2)))
    with pytest.raises(ValueError, match="Unknown conv_feedback 'tied'; choose one of "
                                         r"\['dense', 'shared_kernel'\]"):
        convert(TwoConvs("stride2_same"), "dfa", conv_feedback="tied")


# =========================================================================================
# 4. DFA through the converter equals the DFA chain layers on an MLP
# =========================================================================================


class PlainMLP(nn.Module):
    hidden: tuple = (7, 6, 5)

    @nn.compact
    def __call__(self, x):
        for index, width in enumerate(self.hidden):
            x = jnp.tanh(nn.Dense(width, name=f"layer_{index}")(x))
        return nn.Dense(4, name=f"layer_{len(self.hidden)}")(x)


def test_dfa_converted_mlp_equals_the_dfa_layers_for_the_same_matrices():
    rng = np.random.default_rng(7)
    x, labels = jnp.asarray(rng.normal(size=(6, 8))), jnp.asarray([0, 1, 2, 3, 1, 0])
    chain = bioflax.BioNeuralNetwork((7, 6, 5), ("tanh",) * 3, 4, rule="dfa")
    chain_vars = randomized(chain.init(jax.random.key(0), x), 8)
    converted = convert(PlainMLP(), "dfa")
    converted_vars = converted.init(jax.random.key(0), x)
    # layer i's B (features_i, n_out) of the chain is the matrix at layer i+1's input
    converted_vars = {"params": chain_vars["params"], "feedback": {
        f"layer_{i + 1}": {"output_feedback": chain_vars["feedback"][f"layer_{i}"][
            "feedback_kernel"]} for i in range(3)}}
    assert jax.tree.structure(converted_vars) == jax.tree.structure(
        jax.tree.map(lambda _: 0, converted.init(jax.random.key(0), x)))
    _, chain_grads, _ = converted_grads(chain, chain_vars, x, labels)
    _, grads, _ = converted_grads(converted, converted_vars, x, labels)
    for name in chain_grads:
        for leaf in ("kernel", "bias"):
            close(grads[name][leaf], np.asarray(chain_grads[name][leaf]), f"{name}/{leaf}")


# =========================================================================================
# 5. The contract: trees, keep_backprop, parameters outside Dense/Conv, bad input
# =========================================================================================


def test_keep_backprop_by_path_and_by_predicate():
    rng = np.random.default_rng(9)
    x, labels = rng.normal(size=(3, 8, 8, 2)), jnp.asarray([0, 2, 1])
    reference_model = convert(SmallCNN(), "bp")
    variables = randomized(convert(SmallCNN(), "fa").init(jax.random.key(0), jnp.asarray(x)), 2)
    _, bp_grads, _ = converted_grads(reference_model, {"params": variables["params"]}, x,
                                     labels)
    for keep in (["Dense_0"], lambda path, module: isinstance(module, nn.Dense)):
        model = convert(SmallCNN(), "fa", keep_backprop=keep)
        kept_vars = model.init(jax.random.key(0), jnp.asarray(x))
        assert set(kept_vars["feedback"]) == {"Conv_0", "Conv_1"}
        kept_vars = {"params": variables["params"],
                     "feedback": {k: variables["feedback"][k] for k in ("Conv_0", "Conv_1")}}
        _, grads, _ = converted_grads(model, kept_vars, x, labels)
        # the output layer is above every FA layer, so its gradient is backprop's; the
        # first conv receives the BP signal of the dense layer: not an FA one any more
        close(grads["Dense_0"]["kernel"], np.asarray(bp_grads["Dense_0"]["kernel"]), "Dense")
        _, fa_grads, _ = converted_grads(convert(SmallCNN(), "fa"), variables, x, labels)
        assert not np.allclose(grads["Conv_1"]["kernel"], fa_grads["Conv_1"]["kernel"])


def test_summary_lists_converted_and_backprop_layers():
    for conv_impl, conv_class in (("xla", "Conv (xla)"), ("banded", "Conv (banded)"),
                                  ("auto", "Conv (banded)" if jax.default_backend() == "cpu"
                                   else "Conv (xla)")):
        text = bioflax.convert_summary(
            convert(ResidualBlock(), "kp", keep_backprop="Dense_0", conv_impl=conv_impl),
            jnp.zeros((1, 4, 4, 2)))
        lines = text.splitlines()
        # columns: path, class (with a Conv layer's convolution), rule
        columns = [re.split(r"\s{2,}", line.strip()) for line in lines[2:-1]]
        assert [[path, layer, rule.split()[0]] for path, layer, rule in columns] == [
            ["Conv_0", conv_class, "kp"], ["BatchNorm_0", "BatchNorm", "bp"],
            ["Conv_1", conv_class, "kp"], ["BatchNorm_1", "BatchNorm", "bp"],
            ["Dense_0", "Dense", "bp"]], conv_impl
        assert lines[-1] == "2 layers trained by 'kp', 3 by backprop."


def test_unknown_conv_impl_names_the_choices():
    with pytest.raises(ValueError, match="Unknown conv_impl 'cudnn'; choose one of "
                                         r"\['xla', 'banded', 'auto'\]"):
        convert(SmallCNN(), "bp", conv_impl="cudnn")


def test_other_layer_classes_stay_on_backprop():
    class Mixed(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.ConvTranspose(5, (2,))(x)
            return nn.Dense(2)(x.reshape((x.shape[0], -1)))

    variables = convert(Mixed(), "fa").init(jax.random.key(0), jnp.zeros((1, 4, 3)))
    assert set(variables["feedback"]) == {"Dense_0"}


def test_unknown_rule_names_the_choices():
    with pytest.raises(ValueError, match="Unknown rule 'xx'; choose one of .*'brsf'"):
        convert(SmallCNN(), "xx")
    with pytest.raises(ValueError, match="takes the options"):
        convert(SmallCNN(), "fa", interpolation_factor=0.2)


def test_module_without_dense_or_conv_is_refused_at_init():
    class NoLayers(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.LayerNorm()(x)

    with pytest.raises(ValueError, match="called no nn.Dense or nn.Conv"):
        convert(NoLayers(), "fa").init(jax.random.key(0), jnp.zeros((2, 3)))


def test_dfa_refuses_an_output_that_is_not_batch_by_outputs():
    class ImageOut(nn.Module):  # a (2, 3, 3, 2) map from a layer reading (2, 5, 5, 3)
        @nn.compact
        def __call__(self, x):
            return nn.Conv(2, (3, 3), strides=2)(nn.relu(nn.Conv(3, (3, 3))(x)))

    class ScalarOut(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(1)(nn.relu(nn.Dense(3)(x)))[:, 0]

    # an output with more axes is token-wise DFA when its leading axes are every input's
    with pytest.raises(ValueError, match=r"leading axes are not those of the model's "
                                         r"output \(2, 3, 3, 2\)"):
        convert(ImageOut(), "dfa").init(jax.random.key(0), jnp.zeros((2, 5, 5, 1)))
    with pytest.raises(ValueError, match=r"must have shape \(batch, n_outputs\)"):
        convert(ScalarOut(), "dfa").init(jax.random.key(0), jnp.zeros((2, 4)))


def test_exact_backprop_gives_backprop_gradients_for_every_rule():
    rng = np.random.default_rng(11)
    x, labels = rng.normal(size=(4, 5, 5, 3)), jnp.asarray([0, 2, 1, 1])
    # the reference: the plain Flax model, unconverted
    base = randomized(ResidualBlock().init(jax.random.key(0), jnp.asarray(x)), 3)
    _, want, _ = converted_grads(ResidualBlock(), base, x, labels, mutable=["batch_stats"])
    for rule in rules.RULES:
        model = convert(ResidualBlock(), rule)
        variables = model.init(jax.random.key(0), jnp.asarray(x))
        variables = {**variables, "params": {  # base's W and b, beside KP's B
            name: {**leaves, **base["params"][name]}
            for name, leaves in variables["params"].items()}}
        with bioflax.exact_backprop():
            _, grads, _ = converted_grads(model, variables, x, labels, mutable=["batch_stats"],
                                          rngs={"feedback": jax.random.key(0)})
        for name in want:
            for leaf in want[name]:
                close(grads[name][leaf], np.asarray(want[name][leaf]), f"{rule} {name}")


# =========================================================================================
# 6. Alignment metrics on a converted model
# =========================================================================================


@pytest.mark.parametrize("rule", ["fa", "dfa"])
def test_alignment_reports_every_conv_and_dense_layer_of_a_converted_model(rule):
    rng = np.random.default_rng(13)
    x, labels = rng.normal(size=(3, 8, 8, 2)), jnp.asarray([0, 2, 1])
    model = convert(SmallCNN(), rule)
    variables = randomized(model.init(jax.random.key(0), jnp.asarray(x)), 14)
    y, grads, _ = converted_grads(model, variables, x, labels)

    def loss_of_params(params):
        out = model.apply({**variables, "params": params}, jnp.asarray(x))
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(out), labels[:, None], 1))

    values = alignment_lib.Alignment(1)(loss_of_params, variables["params"],
                                          {"feedback": variables["feedback"]}, grads)
    params = jax.tree.map(np.asarray, variables["params"])
    error = softmax_xent_and_error(y, np.asarray(labels))
    feedback = layer_matrices(variables, rule)
    rule_grads, _ = cnn_reference(rule, params, feedback, x, error)
    bp_grads, _ = cnn_reference("bp", params, {}, x, error)
    for name in ("Conv_0", "Conv_1", "Dense_0"):
        flat = [np.concatenate([g[name]["kernel"].ravel(), g[name]["bias"]])
                for g in (rule_grads, bp_grads)]
        np.testing.assert_allclose(values[f"alignment/grad_cosine/{name}"],
                                   np_cosine(*flat), rtol=1e-8, err_msg=name)
        if rule == "fa":
            np.testing.assert_allclose(
                values[f"alignment/weight_cosine/{name}"],
                np_cosine(params[name]["kernel"].ravel(), feedback[name].ravel()), rtol=1e-8)
    # the output layer of an FA net is trained by the exact error; under DFA too
    np.testing.assert_allclose(values["alignment/grad_cosine/Dense_0"], 1.0, rtol=1e-10)
    assert not any(key.startswith("alignment/weight_cosine") for key in values) or rule == "fa"


# =========================================================================================
# 7. The zoo's models train with every rule through the converter
# =========================================================================================


@pytest.mark.parametrize("name, shape", [("lenet5", (2, 32, 32, 1)), ("resnet8", (2, 8, 8, 3))])
def test_zoo_models_convert_with_every_rule(name, shape):
    from bioflax import zoo  # pylint: disable=import-outside-toplevel
    from flax import traverse_util  # pylint: disable=import-outside-toplevel
    model = zoo.CifarResNet(depth=8) if name == "resnet8" else zoo.get_model(name)
    x = jnp.zeros(shape)

    def flat_shapes(tree):
        return {k: v.shape for k, v in traverse_util.flatten_dict(tree, sep="/").items()}

    original = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    for rule in rules.RULES:
        variables = jax.eval_shape(lambda r=rule: convert(model, r).init(jax.random.key(0), x))
        params = flat_shapes(variables["params"])
        added = {k: v for k, v in params.items() if k not in flat_shapes(original["params"])}
        kernels = {k: v for k, v in params.items() if k.endswith("/kernel")}
        # the original's tree, leaf for leaf; KP adds B beside every kernel
        assert {k: v for k, v in params.items() if k not in added} == flat_shapes(
            original["params"]), rule
        assert added == ({k.replace("/kernel", "/feedback_kernel"): v
                          for k, v in kernels.items()} if rule == "kp" else {}), rule
        assert set(variables) - {"params", "feedback"} == set(original) - {"params"}, rule
