"""``bioflax.convert`` on Flax NNX models, against the Linen twin of each model.

Every NNX model here has a Linen twin of the same layers under the same names, whose
gradients under every rule tests/test_convert.py and tests/test_transformers.py check
against hand-derived float64 references. Both are converted, the NNX model's weights and
feedback matrices (random float64 values, so nothing depends on the initialisers) are
copied into the twin's ``'params'`` and ``'feedback'`` collections, and every parameter
gradient (KP's ``feedback_kernel`` included) and the input gradient must agree; the
layout check that comes with the copy (the same variables, names and shapes in both) is
the NNX state contract. brSF, whose per-call matrix the two APIs draw from different
key derivations, is checked against its definition instead (the signal below is
``δ (|M| ⊙ sign W)ᵀ``). Then NNX's state machinery (``nnx.Optimizer``, split/merge,
Orbax), the errors, and the summary.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from flax import traverse_util

import bioflax
from bioflax import nnx_converter, rules, targets
from bioflax.nnx_converter import Feedback
from float64 import ATOL, RTOL, float64_only  # noqa: F401

RULES = tuple(rules.RULES)
TWIN_RULES = tuple(rule for rule in RULES if rule != "brsf")
LAM = 0.3
SEED = 1


def options(rule):
    return {"interpolation_factor": LAM} if rule == "interpolate_fa_bp" else {}


def convert_nnx(model, rule, x, **kwargs):
    example = x if rule in ("dfa", "drtp") else None  # their B_l are shaped by a call on x
    return bioflax.convert(model, rule, rngs=nnx.Rngs(feedback=SEED), example=example,
                           **options(rule), **kwargs)


def value_of(variable):
    return getattr(variable, "value", variable)


def close(got, want, what):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=RTOL, atol=ATOL,
                               err_msg=what)


# =========================================================================================
# The models and their Linen twins
# =========================================================================================


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(4, 6, rngs=rngs)
        self.l2 = nnx.Linear(6, 5, rngs=rngs)
        self.l3 = nnx.Linear(5, 3, rngs=rngs)

    def __call__(self, x):
        return self.l3(nnx.relu(self.l2(nnx.relu(self.l1(x)))))


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(6, name="l1")(x))
        return nn.Dense(3, name="l3")(nn.relu(nn.Dense(5, name="l2")(x)))


class CNN(nnx.Module):
    def __init__(self, rngs):
        self.conv1 = nnx.Conv(2, 3, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.head = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.conv2(nnx.relu(self.conv1(x))))
        x = nnx.avg_pool(x, (2, 2), strides=(2, 2))
        return self.head(x.reshape((x.shape[0], -1)))


class LinenCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(3, (3, 3), name="conv1")(x))
        x = nn.relu(nn.Conv(4, (3, 3), name="conv2")(x))
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        return nn.Dense(3, name="head")(x.reshape((x.shape[0], -1)))


def linen_attention_core(query, key, value, *, is_causal=False, **kwargs):
    """Linen's softmax(QKᵀ)V, for NNX's MultiHeadAttention: NNX's default core,
    ``jax.nn.dot_product_attention``, computes in float32 whatever the inputs' dtype. The
    core is backprop under every rule; the twins differ only by the conversion."""
    assert not is_causal
    return nn.dot_product_attention(query, key, value, **kwargs)


class Attention(nnx.Module):
    def __init__(self, rngs):
        self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=5, qkv_features=4,
                                           out_features=3, decode=False, rngs=rngs,
                                           attention_fn=linen_attention_core)
        self.head = nnx.Linear(3, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(self.attn(x).mean(axis=1))


class LinenAttention(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=4, out_features=3,
                                            name="attn")(x)
        return nn.Dense(2, name="head")(h.mean(axis=1))


class General(nnx.Module):
    """LinearGeneral contracting two axes, then an Einsum contracting two kernel axes."""

    def __init__(self, rngs):
        self.lg = nnx.LinearGeneral((3, 4), (2, 5), axis=(-2, -1), rngs=rngs)
        self.ein = nnx.Einsum("bhk,hkf->bf", (2, 5, 3), (3,), rngs=rngs)

    def __call__(self, x):
        return self.ein(jnp.tanh(self.lg(x)))


class LinenGeneral(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.DenseGeneral((2, 5), axis=(-2, -1), name="lg")(x))
        return nn.Einsum((2, 5, 3), "bhk,hkf->bf", name="ein")(h)


class TiedLM(nnx.Module):
    def __init__(self, rngs):
        # float64 parameters: an nnx.Embed computes in its parameters' initial dtype
        self.embed = nnx.Embed(7, 4, param_dtype=jnp.float64, rngs=rngs)
        self.dense = nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, tokens):
        return self.embed.attend(jnp.tanh(self.dense(self.embed(tokens))))


class LinenTiedLM(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(7, 4, name="embed")
        return embed.attend(jnp.tanh(nn.Dense(4, name="dense")(embed(tokens))))


class Block(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(4, 5, rngs=rngs)
        self.l2 = nnx.Linear(5, 4, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4, name="l2")(jnp.tanh(nn.Dense(5, name="l1")(x)))


class NamedBlocks(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Linear(6, 4, rngs=rngs)
        self.block1 = Block(rngs)
        self.block2 = Block(rngs)
        self.head = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        x = self.block2(jnp.tanh(self.block1(self.embed(x))))
        return self.head(jnp.tanh(x))


class LinenNamedBlocks(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = LinenBlock(name="block1")(nn.Dense(4, name="embed")(x))
        x = LinenBlock(name="block2")(jnp.tanh(x))
        return nn.Dense(3, name="head")(jnp.tanh(x))


class ListBlocks(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Linear(6, 4, rngs=rngs)
        self.blocks = nnx.List([Block(rngs), Block(rngs)])
        self.head = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(jnp.tanh(x))
        return self.head(jnp.tanh(x))


class LinenListBlocks(nn.Module):  # a list attribute: Linen names its items blocks_0, ...
    def setup(self):
        self.embed = nn.Dense(4)
        self.blocks = [LinenBlock(), LinenBlock()]
        self.head = nn.Dense(3)

    def __call__(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(jnp.tanh(x))
        return self.head(jnp.tanh(x))


def inputs(kind, seed=0):
    rng = np.random.default_rng(seed)
    shapes = {"mlp": (3, 4), "cnn": (2, 4, 4, 2), "attention": (2, 3, 5),
              "general": (2, 3, 4), "blocks": (3, 6)}
    if kind == "tied_lm":
        return jnp.asarray(rng.integers(0, 7, size=(2, 3)))
    return jnp.asarray(rng.normal(size=shapes[kind]))


MODELS = {  # name: (NNX class, Linen twin, input kind)
    "mlp": (MLP, LinenMLP, "mlp"),
    "cnn": (CNN, LinenCNN, "cnn"),
    "attention": (Attention, LinenAttention, "attention"),
    "general": (General, LinenGeneral, "general"),
    "tied_lm": (TiedLM, LinenTiedLM, "tied_lm"),
}


# =========================================================================================
# The harness: random float64 variables in the NNX model, copied into the Linen twin
# =========================================================================================


def linen_path(path) -> str:
    """An NNX variable path as the Linen twin's: list items ``blocks/0`` are ``blocks_0``."""
    return re.sub(r"/(\d+)(?=/|$)", r"_\1", "/".join(map(str, path)))


def randomize(model: nnx.Module, seed: int) -> dict:
    """Gives every Param and Feedback variable of ``model`` new float64 values; returns
    them as ``{(collection, Linen path): value}``."""
    rng = np.random.default_rng(seed)
    values = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, (nnx.Param, Feedback)):
            node.value = jnp.asarray(0.5 * rng.normal(size=node.value.shape))
            collection = "params" if isinstance(node, nnx.Param) else "feedback"
            values[(collection, linen_path(path))] = node.value
    return values


def build(nnx_class, seed=0) -> nnx.Module:
    """``nnx_class(rngs)`` with random float64 weights, built abstractly (its initialisers,
    whose values would be replaced, are not run)."""
    model = nnx.eval_shape(lambda: nnx_class(nnx.Rngs(0)))
    randomize(model, seed)
    return model


def twin_variables(linen_model, x, values) -> dict:
    """The Linen twin's variables, ``values`` in place of its own; the twin must hold
    exactly the variables (names, shapes, collections) of the NNX model."""
    shapes = jax.eval_shape(linen_model.init, jax.random.key(0), x)
    flat = {(collection, path): leaf.shape for collection in shapes for path, leaf in
            traverse_util.flatten_dict(shapes[collection], sep="/").items()}
    assert flat == {key: value.shape for key, value in values.items()}
    variables = {}
    for (collection, path), value in values.items():
        variables.setdefault(collection, {})[path] = value
    return {c: traverse_util.unflatten_dict(v, sep="/") for c, v in variables.items()}


def labels_of(g):
    """Class labels of the output's shape, for DRTP (any fixed choice will do)."""
    return jnp.argmax(g, axis=-1)


def nnx_grads(converted, x, g):
    """``(y, {Linen path: ∂⟨y, g⟩/∂param}, ∂⟨y, g⟩/∂x or None)`` of the NNX model."""
    differentiable = jnp.issubdtype(x.dtype, jnp.floating)

    def f(model, x):
        y = model(x)
        return jnp.sum(y * g), y

    argnums = (0, 1) if differentiable else 0
    with targets.visible(labels_of(g)):  # DRTP's
        grads, y = nnx.grad(f, argnums=argnums, has_aux=True)(converted, x)
    grads, g_x = grads if differentiable else (grads, None)
    skip = isinstance(converted, nnx_converter.Converted)  # its paths start at 'module'
    flat = {linen_path(path[skip:]): value_of(var) for path, var in nnx.to_flat_state(grads)}
    return y, flat, g_x


def linen_grads(model, variables, x, g):
    def f(params, x):
        return model.apply({**variables, "params": params}, x)

    with targets.visible(labels_of(g)):  # DRTP's
        if jnp.issubdtype(x.dtype, jnp.floating):
            y, pullback = jax.vjp(f, variables["params"], x)
            grads, g_x = pullback(g)
        else:
            y, pullback = jax.vjp(lambda p: f(p, x), variables["params"])
            (grads,), g_x = pullback(g), None
    return y, traverse_util.flatten_dict(grads, sep="/"), g_x


def compare_with_twin(nnx_class, linen_class, x, rule, **kwargs):
    converted = convert_nnx(build(nnx_class), rule, x, **linen_kwargs(kwargs, False))
    values = randomize(converted.module, 3)
    linen = bioflax.convert(linen_class(), rule, **options(rule),
                            **linen_kwargs(kwargs, True))
    variables = twin_variables(linen, x, values)
    y_shape = jax.eval_shape(lambda: linen.apply(variables, x)).shape
    g = jnp.asarray(np.random.default_rng(4).normal(size=y_shape))
    y, grads, g_x = nnx_grads(converted, x, g)
    want_y, want, want_g_x = linen_grads(linen, variables, x, g)
    close(y, want_y, f"{rule}: forward")
    assert set(grads) == set(want), rule
    for path, value in want.items():
        close(grads[path], value, f"{rule}: {path}")
    if g_x is not None:
        close(g_x, want_g_x, f"{rule}: the input's gradient")
    return converted, variables


def linen_kwargs(kwargs, linen):
    """``feedback_points`` given as ``(nnx patterns, linen patterns)``."""
    if "feedback_points" not in kwargs:
        return kwargs
    return {**kwargs, "feedback_points": kwargs["feedback_points"][linen]}


# =========================================================================================
# 1. Gradients equal the Linen twin's, for every rule but brSF
# =========================================================================================


@pytest.mark.parametrize("rule", TWIN_RULES)
@pytest.mark.parametrize("name", MODELS)
def test_gradients_equal_the_linen_twins(name, rule):
    """Forward, every parameter's gradient and the input's equal the Linen twin's; under
    DFA the matrices ``B_l`` are those of the twin, at the layers that read ``x_l``."""
    nnx_class, linen_class, kind = MODELS[name]
    converted, variables = compare_with_twin(nnx_class, linen_class, inputs(kind), rule)
    fixed = traverse_util.flatten_dict(variables.get("feedback", {}), sep="/")
    if rule == "dfa":  # token-wise in the LM: B of shape (features, vocabulary)
        want = {"mlp": {"l2": (6, 3), "l3": (5, 3)},
                "cnn": {"conv2": (48, 3), "head": (16, 3)},
                "attention": {"attn/key": (15, 2), "attn/value": (15, 2),
                              "attn/out": (12, 2), "head": (3, 2)},
                "general": {"ein": (10, 3)},
                "tied_lm": {"embed": (4, 7)}}[name]
        assert {k: v.shape for k, v in fixed.items()} == {
            f"{path}/output_feedback": shape for path, shape in want.items()}


VARIANTS = {  # model, rule, convert's options (both APIs)
    "keep_backprop_fa": ("mlp", "fa", {"keep_backprop": "l2"}),
    "keep_backprop_dfa": ("mlp", "dfa", {"keep_backprop": ["l2"]}),
    "keep_backprop_predicate": ("mlp", "kp", {"keep_backprop": lambda path, _: path == "l3"}),
    "banded_conv": ("cnn", "usf", {"conv_impl": "banded"}),
    "shared_position_feedback": ("attention", "dfa", {"position_feedback": "shared"}),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_convert_options_equal_the_linen_twins(variant):
    name, rule, kwargs = VARIANTS[variant]
    nnx_class, linen_class, kind = MODELS[name]
    _, variables = compare_with_twin(nnx_class, linen_class, inputs(kind), rule, **kwargs)
    if variant == "keep_backprop_dfa":  # a layer on backprop reads its input as BP does
        assert set(variables["feedback"]) == {"l3"}
    if variant == "shared_position_feedback":  # one B of the features for every position
        assert variables["feedback"]["attn"]["key"]["output_feedback"].shape == (5, 2)
        # the output projection contracts heads × depth: features, not positions
        assert variables["feedback"]["attn"]["out"]["output_feedback"].shape == (4, 2)


BLOCKS = {  # NNX model, Linen twin, (NNX feedback points, Linen's)
    "named": (NamedBlocks, LinenNamedBlocks, (("block*",), ("block*",))),
    "list": (ListBlocks, LinenListBlocks, (("blocks/*",), ("blocks_*",))),
}


@pytest.mark.parametrize("setting", BLOCKS)
def test_per_block_dfa_equals_the_linen_twins(setting):
    """Feedback points (two named sub-modules, or the items of an ``nnx.List``, whose NNX
    paths ``blocks/0`` are Linen's ``blocks_0``) receive the twin's ``e B_bᵀ``."""
    nnx_class, linen_class, points = BLOCKS[setting]
    converted, variables = compare_with_twin(nnx_class, linen_class, inputs("blocks"), "dfa",
                                             feedback_points=points)
    blocks = ("block1", "block2") if setting == "named" else ("blocks/0", "blocks/1")
    assert {"/".join(map(str, path[1:])) for path, _ in
            nnx.to_flat_state(nnx.state(converted, Feedback))} == {
        f"{block}/output_feedback" for block in ("head", *blocks)}
    assert set(variables["feedback"]) == {linen_path(block.split("/"))
                                          for block in ("head", *blocks)}


def test_brsf_sends_the_signs_of_w_with_a_fresh_magnitude_at_every_call():
    """One nnx.Linear: the signal below is ``g Bᵀ`` with ``B = |M| ⊙ sign W`` for the ``M``
    drawn (LeCun normal, from a key of the ``'feedback'`` stream), ``dW = xᵀ g``."""
    x, g = inputs("mlp", 5)[:, :4], jnp.asarray(np.random.default_rng(6).normal(size=(3, 2)))
    x = jnp.concatenate([x, x + 1.0])  # 6 rows: g (6, 2) has full column rank
    g = jnp.concatenate([g, -2.0 * g[::-1]])
    layer = nnx.Linear(4, 2, rngs=nnx.Rngs(0))
    converted = bioflax.convert(layer, "brsf", rngs=nnx.Rngs(feedback=SEED))
    kernel = np.asarray(randomize(converted.module, 7)[("params", "kernel")])
    stream = nnx.Rngs(feedback=SEED)
    draws = [np.abs(np.asarray(rules.default_kernel_init(stream.feedback(), (4, 2),
                                                         jnp.float32), np.float64))
             for _ in range(4)]
    matched = []
    for _ in range(2):
        _, grads, g_x = nnx_grads(converted, x, g)
        close(grads["kernel"], np.asarray(x).T @ np.asarray(g), "brsf dW = xᵀ g")
        backward = np.linalg.lstsq(np.asarray(g), np.asarray(g_x), rcond=None)[0].T  # B
        assert np.array_equal(np.sign(backward), np.sign(kernel))
        matched.append([k for k, m in enumerate(draws)
                        if np.allclose(np.abs(backward), m, rtol=1e-9, atol=1e-12)])
    assert len(matched[0]) == len(matched[1]) == 1 and matched[1][0] > matched[0][0]

    # the same seed draws the same matrices
    again = bioflax.convert(layer, "brsf", rngs=nnx.Rngs(feedback=SEED))
    randomize(again.module, 7)
    first, second = nnx_grads(again, x, g)[2], nnx_grads(again, x, g)[2]
    assert not np.allclose(first, second)
    close(first, np.asarray(g) @ (draws[matched[0][0]] * np.sign(kernel)).T,
          "the first call's signal, reproduced")


def test_brsf_parameter_gradients_in_an_mlp_use_each_layers_own_draw():
    """A brSF MLP: two converts with the same seed give the same gradients call by call;
    a second call redraws the hidden layers' signals, not the output layer's ``dW``
    (``h₂ᵀ g``, which needs no ``B``)."""
    x = inputs("mlp")
    model = MLP(nnx.Rngs(0))
    runs = []
    for _ in range(2):
        converted = bioflax.convert(model, "brsf", rngs=nnx.Rngs(feedback=SEED))
        randomize(converted.module, 3)
        g = jnp.asarray(np.random.default_rng(4).normal(size=(3, 3)))
        runs.append([nnx_grads(converted, x, g)[1] for _ in range(2)])
    for path in runs[0][0]:
        close(runs[1][0][path], runs[0][0][path], f"same seed: {path}")
        close(runs[1][1][path], runs[0][1][path], f"same seed, second call: {path}")
    assert not np.allclose(runs[0][0]["l1/kernel"], runs[0][1]["l1/kernel"])
    close(runs[0][0]["l3/kernel"], runs[0][1]["l3/kernel"], "the output layer: true dW")


@pytest.mark.parametrize("name", ["tied_lm", "blocks"])
def test_exact_backprop_gives_the_plain_models_gradients_for_every_rule(name):
    """Under ``exact_backprop()`` (inside the differentiated function) every rule's
    gradients are those of the unconverted model with the same weights (the blocks model
    under DFA with feedback points, the LM through the tied ``attend``)."""
    nnx_class, kind = {"tied_lm": (TiedLM, "tied_lm"), "blocks": (NamedBlocks, "blocks")}[name]
    x, plain = inputs(kind), nnx_class(nnx.Rngs(0))
    weights = randomize(plain, 3)
    g = jnp.asarray(np.random.default_rng(4).normal(size=plain(x).shape))
    _, want, _ = nnx_grads(plain, x, g)
    for rule in RULES:
        points = {"feedback_points": "block*"} if name == "blocks" and rule == "dfa" else {}
        converted = convert_nnx(plain, rule, x, **points)
        for path, node in nnx.iter_graph(converted.module):
            if isinstance(node, nnx.Param) and ("params", linen_path(path)) in weights:
                assert np.array_equal(node.value, weights[("params", linen_path(path))])

        def f(model):
            with bioflax.exact_backprop():
                return jnp.sum(model(x) * g)

        got = {linen_path(path[1:]): value_of(var)
               for path, var in nnx.to_flat_state(nnx.grad(f)(converted))}
        for path, value in want.items():
            close(got[path], value, f"{rule}: {path}")
        if rule in ("fa", "dfa") and name == "blocks":  # without exact_backprop(): the rule
            assert not np.allclose(nnx_grads(converted, x, g)[1]["embed/kernel"],
                                   want["embed/kernel"]), rule


# =========================================================================================
# 2. State as NNX expects it
# =========================================================================================

FEEDBACK_NAMES = {
    "fa": {f"{layer}/feedback_kernel" for layer in ("l1", "l2", "l3")},
    "interpolate_fa_bp": {f"{layer}/feedback_kernel" for layer in ("l1", "l2", "l3")},
    "frsf": {f"{layer}/feedback_magnitude" for layer in ("l1", "l2", "l3")},
    "dfa": {"l2/output_feedback", "l3/output_feedback"},
    "drtp": {"l2/output_feedback", "l3/output_feedback"},
}


def feedback_state(converted) -> dict:
    return {linen_path(path[1:]): np.asarray(value_of(var))
            for path, var in nnx.to_flat_state(nnx.state(converted, Feedback))}


def train(converted, tx, x, labels, steps):
    optimizer = nnx.Optimizer(converted, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        def loss(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), labels).mean()
        optimizer.update(model, nnx.grad(loss)(model))

    for _ in range(steps):
        step(converted, optimizer)


def params_of(converted) -> dict:
    return {linen_path(path[1:]): np.asarray(value_of(var))
            for path, var in nnx.to_flat_state(nnx.state(converted, nnx.Param))}


def test_feedback_variables_are_named_and_only_kps_b_is_a_parameter():
    x = inputs("mlp")
    for rule in RULES:
        converted = convert_nnx(MLP(nnx.Rngs(0)), rule, x)
        assert set(feedback_state(converted)) == FEEDBACK_NAMES.get(rule, set()), rule
        want = {f"{layer}/{leaf}" for layer in ("l1", "l2", "l3")
                for leaf in ("kernel", "bias") + (("feedback_kernel",) if rule == "kp" else ())}
        assert set(params_of(converted)) == want, rule


@pytest.mark.parametrize("rule", ["fa", "frsf", "dfa"])
def test_no_optimizer_touches_the_feedback_variables(rule):
    """``nnx.Optimizer(..., wrt=nnx.Param)`` with AdamW's decoupled weight decay trains every
    parameter and leaves every Feedback variable as it was."""
    x, labels = inputs("mlp"), jnp.asarray([0, 2, 1])
    converted = convert_nnx(MLP(nnx.Rngs(0)), rule, x)
    before, params = feedback_state(converted), params_of(converted)
    train(converted, optax.adamw(1e-2, weight_decay=0.1), x, labels, 3)
    after = feedback_state(converted)
    for path, value in before.items():
        assert np.array_equal(after[path], value), path
    for path, value in params_of(converted).items():
        assert not np.allclose(value, params[path]), f"{rule}: {path} was not trained"


@pytest.mark.parametrize("decay", [0.0, 0.5])
def test_kp_feedback_receives_the_kernels_update(decay):
    """KP: ``W`` and ``B`` receive the same update, so under SGD ``W − B`` is constant, and
    with weight decay applied first it shrinks by ``(1 − lr·wd)`` per step."""
    x, labels, lr, steps = inputs("mlp"), jnp.asarray([0, 2, 1]), 0.1, 3
    converted = convert_nnx(MLP(nnx.Rngs(0)), "kp", x)
    randomize(converted.module, 3)
    before = params_of(converted)
    train(converted, optax.chain(optax.add_decayed_weights(decay), optax.sgd(lr)), x,
          labels, steps)
    after = params_of(converted)
    for layer in ("l1", "l2", "l3"):
        diff = before[f"{layer}/kernel"] - before[f"{layer}/feedback_kernel"]
        close(after[f"{layer}/kernel"] - after[f"{layer}/feedback_kernel"],
              (1 - lr * decay) ** steps * diff, f"{layer}: W - B")
        assert not np.allclose(after[f"{layer}/kernel"], before[f"{layer}/kernel"])


@pytest.mark.parametrize("rule", RULES)
def test_split_and_merge_keep_the_conversion(rule):
    """``nnx.merge(*nnx.split(model))`` is the converted model: its layers' classes, outputs
    and gradients (brSF's next draw too)."""
    x = inputs("attention")
    converted = convert_nnx(Attention(nnx.Rngs(0)), rule, x)
    randomize(converted.module, 3)
    graphdef, state = nnx.split(converted)
    merged = nnx.merge(graphdef, state, copy=True)  # its own variables (brSF's RNG count)
    assert type(merged.module.attn.query) is type(converted.module.attn.query)
    assert type(merged.module.attn.query).__name__ == "RuleLinearGeneral"
    g = jnp.asarray(np.random.default_rng(4).normal(size=(2, 2)))
    y, grads, g_x = nnx_grads(converted, x, g)
    y2, grads2, g_x2 = nnx_grads(merged, x, g)
    assert np.array_equal(y, y2) and np.array_equal(g_x, g_x2)
    for path, value in grads.items():
        assert np.array_equal(grads2[path], value), f"{rule}: {path}"


def test_an_orbax_checkpoint_restores_into_a_fresh_conversion(tmp_path):
    """``nnx.state`` saved by Orbax and restored into the state of a fresh conversion
    (other weights, other feedback seed) gives the saved model's gradients exactly: for
    each kind of state (Feedback matrices, KP's Param ``B``, DFA's ``B_l``, brSF's RNG)."""
    ocp = pytest.importorskip("orbax.checkpoint")
    x = inputs("mlp")
    g = jnp.asarray(np.random.default_rng(4).normal(size=(3, 3)))
    checkpointer = ocp.StandardCheckpointer()
    for rule in ("fa", "kp", "dfa", "brsf"):
        converted = convert_nnx(MLP(nnx.Rngs(0)), rule, x)
        randomize(converted.module, 3)
        checkpointer.save(tmp_path / rule, nnx.state(converted))
        checkpointer.wait_until_finished()
        want = nnx_grads(converted, x, g)[1]

        fresh = bioflax.convert(MLP(nnx.Rngs(5)), rule, rngs=nnx.Rngs(feedback=9),
                                example=x if rule == "dfa" else None)
        randomize(fresh.module, 8)
        assert not np.allclose(nnx_grads(fresh, x, g)[1]["l1/kernel"], want["l1/kernel"])
        nnx.update(fresh, checkpointer.restore(tmp_path / rule, nnx.state(fresh)))
        got = nnx_grads(fresh, x, g)[1]
        for path, value in want.items():
            assert np.array_equal(got[path], value), f"{rule}: {path}"


# =========================================================================================
# 3. Bad input: one clear error naming the fix
# =========================================================================================


def test_bad_input_gets_one_clear_error():
    x = inputs("mlp")
    with pytest.raises(ValueError, match=r"Unknown rule 'fax'; choose one of \['bp', 'fa'"):
        bioflax.convert(MLP(nnx.Rngs(0)), "fax")

    class Norm(nnx.Module):
        def __init__(self, rngs):
            self.norm = nnx.LayerNorm(4, rngs=rngs)

        def __call__(self, x):
            return self.norm(x)

    with pytest.raises(ValueError, match="Norm holds no nnx.Linear, nnx.LinearGeneral, "
                                         "nnx.Conv, nnx.Einsum or nnx.Embed"):
        bioflax.convert(Norm(nnx.Rngs(0)), "fa", rngs=nnx.Rngs(feedback=0))
    for kwargs in ({"rngs": nnx.Rngs(0)}, {"example": x}):
        with pytest.raises(ValueError, match="rngs= and example= are for NNX models; a "
                                             "Linen model draws .* at init"):
            bioflax.convert(LinenMLP(), "fa", **kwargs)
    for rule in ("fa", "kp", "interpolate_fa_bp", "frsf", "brsf"):
        with pytest.raises(ValueError, match=r"layer 'l1' draws feedback weights: pass "
                                             r"rngs=nnx.Rngs\(feedback=seed\) to "):
            bioflax.convert(MLP(nnx.Rngs(0)), rule)
        with pytest.raises(ValueError, match=r"pass rngs=nnx.Rngs\(feedback=seed\), with "
                                             r"a 'feedback' or 'default' stream"):
            bioflax.convert(MLP(nnx.Rngs(0)), rule, rngs=nnx.Rngs(params=0))
    for rule in ("bp", "usf"):  # no random matrix: no rngs needed
        bioflax.convert(MLP(nnx.Rngs(0)), rule)
    with pytest.raises(ValueError, match="DFA's feedback matrices are shaped by the model's "
                                         "output and each layer's input: pass example=x"):
        bioflax.convert(MLP(nnx.Rngs(0)), "dfa", rngs=nnx.Rngs(feedback=0))
    with pytest.raises(ValueError, match=r"layer 'l2' draws feedback weights: pass rngs="):
        bioflax.convert(MLP(nnx.Rngs(0)), "dfa", example=x)
    with pytest.raises(ValueError, match=r"feedback point 'blok\*' matches no module; the "
                                         r"module paths are \['block1/l1', "):
        bioflax.convert(NamedBlocks(nnx.Rngs(0)), "dfa", rngs=nnx.Rngs(0),
                        example=inputs("blocks"), feedback_points="blok*")
    with pytest.raises(ValueError, match="feedback_points are DFA's"):
        bioflax.convert(NamedBlocks(nnx.Rngs(0)), "fa", rngs=nnx.Rngs(0),
                        feedback_points="block*")
    with pytest.raises(ValueError, match="NNX models take DFA with conv_feedback='dense'"):
        bioflax.convert(CNN(nnx.Rngs(0)), "dfa", conv_feedback="shared_kernel",
                        rngs=nnx.Rngs(0), example=inputs("cnn"))
    with pytest.raises(TypeError, match="bioflax.convert takes a flax.linen.Module or a "
                                        "flax.nnx.Module, not function"):
        bioflax.convert(lambda x: x, "fa")


def test_a_single_layer_model_converts_and_layers_keep_their_signatures():
    x = inputs("mlp")
    layer = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    converted = bioflax.convert(layer, "fa", rngs=nnx.Rngs(feedback=0))
    assert set(feedback_state(converted)) == {"feedback_kernel"}
    close(converted(x), layer(x), "forward")
    assert type(layer) is nnx.Linear  # the original is left as it was
    close(converted.module(x, out_sharding=None), layer(x), "Linear's own arguments")
    lm = TiedLM(nnx.Rngs(0))
    embed = bioflax.convert(lm, "fa", rngs=nnx.Rngs(feedback=0)).module.embed
    query = jnp.ones((2, 4))
    close(embed.attend(query, out_sharding=None), lm.embed.attend(query), "Embed.attend's")


# =========================================================================================
# 4. The summary
# =========================================================================================


def rows_of(text):
    lines = text.splitlines()
    return ({path: (layer, rule) for path, layer, rule in
             (re.split(r"\s{2,}", line.strip(), maxsplit=2) for line in lines[2:-1])},
            lines[-1])


def test_summary_lists_every_projection_with_its_rule():
    converted = convert_nnx(Attention(nnx.Rngs(0)), "fa", inputs("attention"))
    rows, footer = rows_of(bioflax.convert_summary(converted))
    assert rows == {**{f"attn/{name}": ("LinearGeneral", "fa")
                       for name in ("key", "out", "query", "value")},
                    "head": ("Linear", "fa")}
    assert footer == "5 layers trained by 'fa', 0 by backprop."


def test_summary_shows_feedback_points_kept_layers_and_the_rest():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.blocks = NamedBlocks(rngs)
            self.norm = nnx.LayerNorm(3, rngs=rngs)
            self.bias = nnx.Param(jnp.zeros(3))

        def __call__(self, x):
            return self.norm(self.blocks(x)) + self.bias

    x = inputs("blocks")
    converted = bioflax.convert(Net(nnx.Rngs(0)), "dfa", rngs=nnx.Rngs(0), example=x,
                                feedback_points="blocks/block1", keep_backprop="*/head")
    rows, footer = rows_of(bioflax.convert_summary(converted, x))
    inside = "dfa (backprop inside 'blocks/block1')"
    assert rows == {"(top)": ("Net", "bp (the model's own parameters)"),
                    "blocks/block1/l1": ("Linear", inside),
                    "blocks/block1/l2": ("Linear", inside),
                    "blocks/block2/l1": ("Linear", "dfa"),
                    "blocks/block2/l2": ("Linear", "dfa"),
                    "blocks/embed": ("Linear", "dfa"),
                    "blocks/head": ("Linear", "bp"),
                    "norm": ("LayerNorm", "bp (not a converted layer class)")}
    assert footer == "5 layers trained by 'dfa', 3 by backprop."

    cnn = bioflax.convert(CNN(nnx.Rngs(0)), "kp", rngs=nnx.Rngs(0), conv_impl="banded")
    assert rows_of(bioflax.convert_summary(cnn))[0]["conv1"] == ("Conv (banded)", "kp")
    lm = convert_nnx(TiedLM(nnx.Rngs(0)), "usf", None)
    assert rows_of(bioflax.convert_summary(lm))[0]["embed"] == ("Embed.attend", "usf")

    class Lookup(nnx.Module):  # an Embed whose attend is never called
        def __init__(self, rngs):
            self.embed = nnx.Embed(7, 4, rngs=rngs)
            self.head = nnx.Linear(4, 2, rngs=rngs)

        def __call__(self, tokens):
            return self.head(self.embed(tokens))

    text = bioflax.convert_summary(bioflax.convert(Lookup(nnx.Rngs(0)), "usf"),
                                   inputs("tied_lm"))
    assert rows_of(text) == ({"embed": ("Embed", "bp (embedding lookup: first layer of its "
                                                 "path)"), "head": ("Linear", "usf")},
                             "1 layers trained by 'usf', 1 by backprop.")
