"""Every weight of a Transformer under every rule, against hand-written float64 references.

``nn.DenseGeneral`` (two contracting axes; ``batch_dims``), the four projections of
``nn.MultiHeadDotProductAttention``, ``nn.Einsum`` and ``nn.Embed.attend`` under FA, KP,
uSF, frSF and the FA↔BP interpolation; token-wise and per-block DFA. Each reference is
NumPy written from the definitions (README's rule table: ``dW`` the usual one, the signal
below the input-VJP of the same contraction with ``B``; Launay et al. 2020 for DFA);
JAX's autodiff only differentiates the code under test.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

import bioflax
from bioflax import convert, rules, targets
from float64 import ATOL, RTOL, float64_only  # noqa: F401

KERNEL_RULES = ("bp", "fa", "kp", "interpolate_fa_bp", "usf", "frsf")
LAM = 0.3


def options(rule):
    return {"interpolation_factor": LAM} if rule == "interpolate_fa_bp" else {}


def np_backward(rule, kernel, stored, fan_in):
    """``B`` of README's rule table; uSF's constant counts the contracted inputs."""
    return {
        "bp": lambda: kernel,
        "fa": lambda: stored,
        "kp": lambda: stored,
        "interpolate_fa_bp": lambda: LAM * stored + (1 - LAM) * kernel,
        "usf": lambda: np.sign(kernel) / math.sqrt(fan_in),
        "frsf": lambda: np.abs(stored) * np.sign(kernel),
    }[rule]()


def stored(variables, path, rule):
    """The rule's matrix of the layer at ``path`` (``'a/b'``), None for bp/uSF."""
    name = "feedback_magnitude" if rule == "frsf" else "feedback_kernel"
    tree = variables["params"] if rule == "kp" else variables.get("feedback", {})
    for key in path.split("/"):
        tree = tree.get(key, {})
    return None if name not in tree else np.asarray(tree[name])


def randomized(variables, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda leaf: jnp.asarray(0.5 * rng.normal(size=leaf.shape)),
                        variables)


def vjp(model, variables, x, cotangent, **kwargs):
    """``(y, ∂⟨y, G⟩/∂params, ∂⟨y, G⟩/∂x)`` of the converted model."""
    def f(params, inputs):
        return model.apply({**variables, "params": params}, inputs, **kwargs)
    y, pullback = jax.vjp(f, variables["params"], jnp.asarray(x))
    grads, g_x = pullback(jnp.asarray(cotangent))
    return np.asarray(y), jax.tree.map(np.asarray, grads), np.asarray(g_x)


def close(got, want, what):
    np.testing.assert_allclose(np.asarray(got), want, rtol=RTOL, atol=ATOL, err_msg=what)


def setup(module, rule, x, seed, out_shape, **convert_options):
    model = convert(module, rule, **options(rule), **convert_options)
    variables = randomized(model.init(jax.random.key(0), jnp.asarray(x)), seed)
    cotangent = np.random.default_rng(seed + 1).normal(size=out_shape)
    return model, variables, cotangent


# =========================================================================================
# 1. DenseGeneral: two contracting axes; batch_dims
# =========================================================================================

DENSE_GENERAL = {
    # x (b, i, j, k), contracting i, j: y[b,k,f,g] = Σ_ij x[b,i,j,k] W[i,j,f,g]; fan_in i·j
    "two_axes": (dict(features=(3, 2), axis=(1, 2)), (2, 3, 4, 5), "bijk,ijfg->bkfg",
                 (2, 5, 3, 2), 12),
    # batch_dims=(0,): y[b,t,f] = Σ_d x[b,t,d] W[b,d,f]; fan_in d alone (not b·d)
    "batch_dims": (dict(features=2, axis=-1, batch_dims=(0,)), (4, 3, 5), "btd,bdf->btf",
                   (4, 3, 2), 5),
}


def einsum_grads(spec, x, kernel, backward, g):
    """``dW`` and the signal below for ``y = einsum(spec, x, W)`` with ``B`` for ``W``."""
    inputs, out = spec.split("->")
    x_sub, w_sub = inputs.split(",")
    return (np.einsum(f"{x_sub},{out}->{w_sub}", x, g),
            np.einsum(f"{out},{w_sub}->{x_sub}", g, backward))


@pytest.mark.parametrize("rule", KERNEL_RULES)
@pytest.mark.parametrize("setting", DENSE_GENERAL)
def test_dense_general_matches_hand_derived_reference(rule, setting):
    fields, x_shape, spec, y_shape, fan_in = DENSE_GENERAL[setting]
    x = np.random.default_rng(0).normal(size=x_shape)
    model, variables, g = setup(nn.DenseGeneral(**fields), rule, x, 1, y_shape)
    y, grads, g_x = vjp(model, variables, x, g)
    kernel = np.asarray(variables["params"]["kernel"])
    bias = np.asarray(variables["params"]["bias"])
    b_shape = (len(x),) + (1,) * (y.ndim - bias.ndim) + bias.shape[1:] if fields.get(
        "batch_dims") else bias.shape
    close(y, np.einsum(spec, x, kernel) + bias.reshape(b_shape), "forward")
    backward = np_backward(rule, kernel, _own(variables, rule), fan_in)
    d_kernel, d_x = einsum_grads(spec, x, kernel, backward, g)
    close(grads["kernel"], d_kernel, f"{rule} dW")
    close(g_x, d_x, f"{rule} signal below")
    if rule == "kp":
        close(grads["feedback_kernel"], d_kernel, "kp: B receives dW")


def _own(variables, rule):
    """The stored matrix of a model that is a single layer (at the root of the tree)."""
    name = "feedback_magnitude" if rule == "frsf" else "feedback_kernel"
    tree = variables["params"] if rule == "kp" else variables.get("feedback", {})
    return None if name not in tree else np.asarray(tree[name])


def test_brsf_dense_general_signal_has_the_signs_of_w_and_usual_dw():
    fields, x_shape, spec, y_shape, _ = DENSE_GENERAL["two_axes"]
    x = np.random.default_rng(0).normal(size=x_shape)
    model, variables, g = setup(nn.DenseGeneral(**fields), "brsf", x, 1, y_shape)
    kernel = np.asarray(variables["params"]["kernel"])
    got = [vjp(model, variables, x, g, rngs={"feedback": jax.random.key(k)})
           for k in (0, 1)]
    for _, grads, _ in got:
        close(grads["kernel"], einsum_grads(spec, x, kernel, kernel, g)[0], "brsf dW")
    assert not np.allclose(got[0][2], got[1][2])  # a new B at every step


# =========================================================================================
# 2. MultiHeadDotProductAttention: all four projections
# =========================================================================================


def np_softmax(a):
    p = np.exp(a - a.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def attention_forward(p, x):
    """Self-attention with heads, by hand: the projections ``q`` (scaled), ``k``, ``v``,
    the attention weights, the heads' output ``o`` (the out projection's input) and ``y``."""
    proj = {n: np.einsum("btd,dhk->bthk", x, p[n]["kernel"]) + p[n]["bias"]
            for n in ("query", "key", "value")}
    q = proj["query"] / np.sqrt(proj["query"].shape[-1])
    k, v = proj["key"], proj["value"]
    att = np_softmax(np.einsum("bqhd,bshd->bhqs", q, k))
    o = np.einsum("bhqs,bshd->bqhd", att, v)
    y = np.einsum("bqhd,hdf->bqf", o, p["out"]["kernel"]) + p["out"]["bias"]
    return q, k, v, att, o, y


def attention_core_backward(q, k, v, att, d_o):
    """The exact derivative of softmax(QKᵀ/√d)V: the signals reaching the query, key and
    value projections' outputs from ``d_o`` at the heads' output."""
    d_att = np.einsum("bqhd,bshd->bhqs", d_o, v)
    d_v = np.einsum("bhqs,bqhd->bshd", att, d_o)
    d_logits = att * (d_att - (d_att * att).sum(-1, keepdims=True))
    d_q = np.einsum("bhqs,bshd->bqhd", d_logits, k) / np.sqrt(q.shape[-1])
    d_k = np.einsum("bhqs,bqhd->bshd", d_logits, q)
    return {"query": d_q, "key": d_k, "value": d_v}


def attention_reference(p, bs, x, g):
    """Self-attention with heads, by hand: forward, then backward with ``B`` per
    projection (``bs[name]``); the softmax(QKᵀ)V core by its exact derivative."""
    q, k, v, att, o, y = attention_forward(p, x)
    grads = {"out": {"kernel": np.einsum("bqhd,bqf->hdf", o, g), "bias": g.sum((0, 1))}}
    d_o = np.einsum("bqf,hdf->bqhd", g, bs["out"])
    d_x = 0
    for name, delta in attention_core_backward(q, k, v, att, d_o).items():
        grads[name] = {"kernel": np.einsum("btd,bthk->dhk", x, delta),
                       "bias": delta.sum((0, 1))}
        d_x = d_x + np.einsum("bthk,dhk->btd", delta, bs[name])
    return y, grads, d_x


@pytest.mark.parametrize("rule", KERNEL_RULES)
def test_attention_projections_match_hand_derived_reference(rule):
    x = np.random.default_rng(2).normal(size=(2, 3, 5))
    layer = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=4, out_features=3)
    model, variables, g = setup(layer, rule, x, 3, (2, 3, 3))
    y, grads, g_x = vjp(model, variables, x, g)
    params = jax.tree.map(np.asarray, variables["params"])
    fan_ins = {"query": 5, "key": 5, "value": 5, "out": 4}  # out contracts heads × depth
    bs = {n: np_backward(rule, params[n]["kernel"], stored(variables, n, rule), fan_ins[n])
          for n in fan_ins}
    want_y, want, d_x = attention_reference(params, bs, x, g)
    close(y, want_y, "forward")
    for name, leaves in want.items():
        for leaf, value in leaves.items():
            close(grads[name][leaf], value, f"{rule} {name}/{leaf}")
    close(g_x, d_x, f"{rule}: signal to the block input")


# =========================================================================================
# 3. Einsum
# =========================================================================================

EINSUMS = {
    # kernel axes shared with the input and not the output are contracted: fan_in = d
    "project": ((5, 2, 3), "btd,dhk->bthk", (2, 3, 5), 5),
    "per_head": ((2, 4, 3), "bhd,hdk->bhk", (2, 2, 4), 4),  # h is a batch axis
}


@pytest.mark.parametrize("rule", KERNEL_RULES)
@pytest.mark.parametrize("setting", EINSUMS)
def test_einsum_matches_hand_derived_reference(rule, setting):
    shape, spec, x_shape, fan_in = EINSUMS[setting]
    x = np.random.default_rng(4).normal(size=x_shape)
    y_shape = jax.eval_shape(lambda: jnp.einsum(spec, jnp.zeros(x_shape),
                                                jnp.zeros(shape))).shape
    model, variables, g = setup(nn.Einsum(shape, spec), rule, x, 5, y_shape)
    y, grads, g_x = vjp(model, variables, x, g)
    kernel = np.asarray(variables["params"]["kernel"])
    d_kernel, d_x = einsum_grads(spec, x, kernel,
                                 np_backward(rule, kernel, _own(variables, rule), fan_in), g)
    close(grads["kernel"], d_kernel, f"{rule} dW")
    close(g_x, d_x, f"{rule} signal below")
    plain = nn.Einsum(shape, spec)
    close(y, plain.apply({"params": variables["params"]} if rule != "kp" else {
        "params": {k: v for k, v in variables["params"].items() if k != "feedback_kernel"}},
        jnp.asarray(x)), "forward equals nn.Einsum's")


# =========================================================================================
# 4. Embed: the lookup keeps its gradient, attend trains by the rule
# =========================================================================================


class TiedLM(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(7, 4)
        return embed.attend(nn.Dense(4)(embed(tokens)))


@pytest.mark.parametrize("rule", KERNEL_RULES)
def test_tied_embedding_attend_uses_a_feedback_matrix_of_the_embedding_shape(rule):
    tokens = jnp.asarray([[1, 3, 3], [6, 0, 2]])
    model = convert(TiedLM(), rule, **options(rule))
    variables = randomized(model.init(jax.random.key(0), tokens), 6)
    g = np.random.default_rng(7).normal(size=(2, 3, 7))

    def f(params):
        return model.apply({**variables, "params": params}, tokens)
    y, pullback = jax.vjp(f, variables["params"])
    (grads,) = pullback(jnp.asarray(g))
    p = jax.tree.map(np.asarray, variables["params"])
    emb, w = p["Embed_0"]["embedding"], p["Dense_0"]["kernel"]
    x = emb[np.asarray(tokens)]
    h = x @ w + p["Dense_0"]["bias"]
    close(y, h @ emb.T, "forward")
    b_embed = np_backward(rule, emb, stored(variables, "Embed_0", rule), 4)
    if rule in ("fa", "kp", "interpolate_fa_bp", "frsf"):
        assert stored(variables, "Embed_0", rule).shape == emb.shape
    d_h = g @ b_embed  # attend's signal: the VJP of q ↦ q Eᵀ with B for E
    d_x = d_h @ np_backward(rule, w, stored(variables, "Dense_0", rule), 4).T
    d_emb = np.einsum("btv,btd->vd", g, h)  # attend's dW
    np.add.at(d_emb, np.asarray(tokens), d_x)  # plus the lookup's ordinary gradient
    close(grads["Embed_0"]["embedding"], d_emb, f"{rule}: embedding")
    close(grads["Dense_0"]["kernel"], np.einsum("btd,bte->de", x, d_h), f"{rule}: dense")


# =========================================================================================
# 5. DFA: token-wise (Launay et al. 2020) and per block
# =========================================================================================


class SeqMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(5, name="Dense_0")(x))
        return nn.Dense(3, name="Dense_1")(h)


def test_tokenwise_dfa_sends_each_positions_error_to_the_same_position():
    x = np.random.default_rng(8).normal(size=(2, 4, 6))
    model, variables, e = setup(SeqMLP(), "dfa", x, 9, (2, 4, 3))
    y, grads, _ = vjp(model, variables, x, e)
    p = jax.tree.map(np.asarray, variables["params"])
    b1 = np.asarray(variables["feedback"]["Dense_1"]["output_feedback"])
    assert b1.shape == (5, 3) and "Dense_0" not in variables["feedback"]
    a1 = x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
    h1 = np.tanh(a1)
    close(y, h1 @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"], "forward")
    # Launay: δ_out = e (the output layer's true gradient); δ_1 = (e B_1ᵀ) ⊙ f'(a_1)
    delta1 = (e @ b1.T) * (1 - h1 ** 2)
    close(grads["Dense_1"]["kernel"], np.einsum("btf,bto->fo", h1, e), "head dW = h1ᵀ e")
    close(grads["Dense_0"]["kernel"], np.einsum("bti,btf->if", x, delta1), "dW_1")
    close(grads["Dense_0"]["bias"], delta1.sum((0, 1)), "db_1")


class PooledSeq(nn.Module):
    @nn.compact
    def __call__(self, x):
        h1 = jnp.tanh(nn.Dense(5, name="Dense_0")(x))
        h2 = jnp.tanh(nn.Dense(4, name="Dense_1")(h1))
        return nn.Dense(3, name="head")(h2.mean(axis=1))


def test_shared_position_feedback_sends_the_error_to_every_position():
    """A (batch, 3) output over (batch, T, ·) layer inputs: with ``position_feedback=
    'shared'`` each ``B_l`` has the features' shape and every position of ``x_l`` receives
    ``e B_lᵀ`` (TinyDFA's repeated projection); the head's input has no positions."""
    x = np.random.default_rng(13).normal(size=(2, 4, 6))
    model, variables, e = setup(PooledSeq(), "dfa", x, 14, (2, 3), position_feedback="shared")
    y, grads, _ = vjp(model, variables, x, e)
    p = jax.tree.map(np.asarray, variables["params"])
    fb = {name: np.asarray(v["output_feedback"]) for name, v in variables["feedback"].items()}
    assert {name: b.shape for name, b in fb.items()} == {"Dense_1": (5, 3), "head": (4, 3)}
    h1 = np.tanh(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
    h2 = np.tanh(h1 @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"])
    m = h2.mean(axis=1)
    close(y, m @ p["head"]["kernel"] + p["head"]["bias"], "forward")
    delta1 = (e @ fb["Dense_1"].T)[:, None, :] * (1 - h1 ** 2)  # the same e B_1ᵀ at each t
    delta2 = (e @ fb["head"].T)[:, None, :] / x.shape[1] * (1 - h2 ** 2)  # through the mean
    close(grads["head"]["kernel"], m.T @ e, "head dW = mᵀ e")
    close(grads["Dense_1"]["kernel"], np.einsum("bti,btf->if", h1, delta2), "dW_1")
    close(grads["Dense_0"]["kernel"], np.einsum("bti,btf->if", x, delta1), "dW_0")


class PooledAttention(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(5, name="Dense_0")(x))
        a = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=4, out_features=5,
                                            name="attn")(h)
        return nn.Dense(3, name="head")(a.mean(axis=1))


def test_shared_position_feedback_counts_the_heads_as_features_not_positions():
    """Per-layer DFA with ``position_feedback='shared'`` through attention: the output
    projection reads ``(batch, T, heads, depth)`` and contracts heads × depth, so its
    ``B`` has shape (heads·depth, n) and each head receives its own part of ``e Bᵀ``;
    the core's exact derivative carries that to the query, key and value projections."""
    x = np.random.default_rng(16).normal(size=(2, 3, 6))
    model, variables, e = setup(PooledAttention(), "dfa", x, 17, (2, 3),
                                position_feedback="shared")
    y, grads, _ = vjp(model, variables, x, e)
    p = jax.tree.map(np.asarray, variables["params"])
    fb = traverse_util.flatten_dict(jax.tree.map(np.asarray, variables["feedback"]), sep="/")
    assert {k: b.shape for k, b in fb.items()} == {
        **{f"attn/{n}/output_feedback": (5, 3) for n in ("query", "key", "value")},
        "attn/out/output_feedback": (2 * 2, 3), "head/output_feedback": (5, 3)}
    h = np.tanh(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
    q, k, v, att, o, a = attention_forward(p["attn"], h)
    m = a.mean(axis=1)
    close(y, m @ p["head"]["kernel"] + p["head"]["bias"], "forward")
    close(grads["head"]["kernel"], m.T @ e, "head dW = mᵀ e")
    d_a = np.broadcast_to((e @ fb["head/output_feedback"].T)[:, None] / x.shape[1], a.shape)
    close(grads["attn"]["out"]["kernel"], np.einsum("bqhd,bqf->hdf", o, d_a), "out dW")
    d_o = (e @ fb["attn/out/output_feedback"].T).reshape(2, 1, 2, 2)  # (batch, ·, heads, depth)
    d_o = np.broadcast_to(d_o, o.shape)
    for name, delta in attention_core_backward(q, k, v, att, d_o).items():
        close(grads["attn"][name]["kernel"], np.einsum("btd,bthk->dhk", h, delta),
              f"{name} dW")
    d_h = sum(e @ fb[f"attn/{n}/output_feedback"].T for n in ("query", "key", "value"))
    delta0 = d_h[:, None, :] * (1 - h ** 2)
    close(grads["Dense_0"]["kernel"], np.einsum("bti,btf->if", x, delta0), "dW_0")


def test_an_unknown_position_feedback_names_the_choices():
    with pytest.raises(ValueError, match="Unknown position_feedback 'tied'.*'shared'"):
        rules.get_rule("dfa", position_feedback="tied")


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        u = jnp.tanh(nn.Dense(5, name="Dense_0")(x))
        return nn.Dense(x.shape[-1], name="Dense_1")(u)


class BlockNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(4, name="embed")(x)
        x = Block()(x)
        x = Block()(jnp.tanh(x))
        return nn.Dense(3, name="head")(jnp.tanh(x))


def test_per_block_dfa_matches_hand_built_version():
    x = np.random.default_rng(10).normal(size=(3, 6))
    model = convert(BlockNet(), "dfa", feedback_points=["Block_*"])
    variables = randomized(model.init(jax.random.key(0), jnp.asarray(x)), 11)
    e = np.random.default_rng(12).normal(size=(3, 3))
    y, grads, _ = vjp(model, variables, x, e)
    fb = jax.tree.map(np.asarray, variables["feedback"])
    assert set(fb) == {"Block_0", "Block_1", "head"}  # embed is the first layer: no B
    p = jax.tree.map(np.asarray, variables["params"])

    def dense(name, v, sub=None):
        leaves = p[name] if sub is None else p[name][sub]
        return v @ leaves["kernel"] + leaves["bias"]

    def block(name, v, signal):
        """A block's forward pass and the backprop of ``signal`` at its output."""
        u = np.tanh(dense(name, v, "Dense_0"))
        out = dense(name, u, "Dense_1")
        if signal is None:
            return out, None, None
        d_u = signal @ p[name]["Dense_1"]["kernel"].T * (1 - u ** 2)
        g = {"Dense_1": u.T @ signal, "Dense_0": v.T @ d_u}
        return out, g, d_u @ p[name]["Dense_0"]["kernel"].T

    a0 = dense("embed", x)
    y0, _, _ = block("Block_0", a0, None)
    y1, _, _ = block("Block_1", np.tanh(y0), None)
    close(y, dense("head", np.tanh(y1)), "forward")
    # every block's output receives e B_bᵀ; inside, backprop; nothing crosses a block's
    # output from above; the head (per-layer DFA outside the points) gets e itself
    _, g1, _ = block("Block_1", np.tanh(y0), e @ fb["Block_1"]["output_feedback"].T)
    _, g0, d_a0 = block("Block_0", a0, e @ fb["Block_0"]["output_feedback"].T)
    close(grads["head"]["kernel"], np.tanh(y1).T @ e, "head")
    for name, g in (("Block_0", g0), ("Block_1", g1)):
        for layer, value in g.items():
            close(grads[name][layer]["kernel"], value, f"{name}/{layer}")
    # below the first block: backprop of what the block sends down
    close(grads["embed"]["kernel"], x.T @ d_a0, "embed")


# =========================================================================================
# 6. A small Transformer: BP checkpoints load; exact_backprop() is backprop; bad input
# =========================================================================================


class TinyTransformer(nn.Module):
    tied: bool = True

    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(9, 8)
        x = embed(tokens) + self.param("pos", nn.initializers.normal(0.02), (4, 8))
        for index in range(2):
            h = nn.LayerNorm(name=f"ln_{index}")(x)
            x = x + nn.SelfAttention(num_heads=2, name=f"attn_{index}")(h)
            h = nn.RMSNorm(name=f"rms_{index}")(x)
            h = nn.Einsum((8, 2, 6), "btd,dhk->bthk", name=f"up_{index}")(h)
            x = x + nn.DenseGeneral(8, axis=(-2, -1), name=f"down_{index}")(nn.gelu(h))
        return embed.attend(x) if self.tied else nn.Dense(9, name="head")(x)


VARIANTS = [(rule, {}) for rule in rules.RULES] + [("dfa", {"feedback_points": ["ln_1"]})]


def flat(tree):
    return {k: v.shape for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


def test_every_projection_is_converted_and_a_bp_checkpoint_loads_into_every_rule():
    tokens = jnp.zeros((2, 4), jnp.int32)
    plain = jax.eval_shape(lambda: TinyTransformer().init(jax.random.key(0), tokens))
    for rule, kwargs in VARIANTS:
        model = convert(TinyTransformer(), rule, **options(rule), **kwargs)
        variables = jax.eval_shape(lambda m=model: m.init(jax.random.key(0), tokens))
        params = flat(variables["params"])
        added = {k: v for k, v in params.items() if k not in flat(plain["params"])}
        assert {k: v for k, v in params.items() if k not in added} == flat(plain["params"])
        want_added = {k.replace("/kernel", "/feedback_kernel").replace(
            "/embedding", "/feedback_kernel"): v for k, v in params.items()
            if k.endswith(("/kernel", "/embedding"))} if rule == "kp" else {}
        assert added == want_added, rule
    lines = bioflax.convert_summary(convert(TinyTransformer(), "fa"), tokens).splitlines()
    rows = {path: (layer, rule) for path, layer, rule in
            (re.split(r"\s{2,}", line.strip()) for line in lines[2:-1])}
    projections = {f"attn_{i}/{n}": ("DenseGeneral", "fa")
                   for i in range(2) for n in ("query", "key", "value", "out")}
    projections.update({f"up_{i}": ("Einsum", "fa") for i in range(2)})
    projections.update({f"down_{i}": ("DenseGeneral", "fa") for i in range(2)})
    projections["Embed_0"] = ("Embed.attend", "fa")
    assert {k: v for k, v in rows.items() if v[1] == "fa"} == projections
    assert {v for k, v in rows.items() if k not in projections} == {
        ("LayerNorm", "bp (not a converted layer class)"),
        ("RMSNorm", "bp (not a converted layer class)"),
        ("TinyTransformer", "bp (the model's own parameters)")}  # the position embedding
    assert lines[-1] == "13 layers trained by 'fa', 5 by backprop."


@pytest.mark.parametrize("tied", [True, False])
def test_exact_backprop_gives_the_plain_models_gradients_for_every_rule(tied):
    rng = np.random.default_rng(13)
    tokens = jnp.asarray(rng.integers(0, 9, size=(2, 4)))
    base = randomized(TinyTransformer(tied).init(jax.random.key(0), tokens), 14)
    g = jnp.asarray(rng.normal(size=(2, 4, 9)))

    def grads_of(model, variables, **kwargs):
        def f(params):
            return jnp.sum(g * model.apply({**variables, "params": params}, tokens, **kwargs))
        with targets.visible(jnp.argmax(g, axis=-1)):  # DRTP's
            return jax.grad(f)(variables["params"])

    want = traverse_util.flatten_dict(grads_of(TinyTransformer(tied), base), sep="/")
    for rule, kwargs in VARIANTS:
        model = convert(TinyTransformer(tied), rule, **options(rule), **kwargs)
        variables = model.init(jax.random.key(0), tokens)
        merged = {**traverse_util.flatten_dict(variables["params"], sep="/"),
                  **traverse_util.flatten_dict(base["params"], sep="/")}
        variables = {**variables, "params": traverse_util.unflatten_dict(merged, sep="/")}
        with bioflax.exact_backprop():
            got = traverse_util.flatten_dict(
                grads_of(model, variables, rngs={"feedback": jax.random.key(0)}), sep="/")
        for key, value in want.items():
            close(got[key], np.asarray(value), f"{rule} {kwargs} {key}")
        if rule != "bp":  # and without exact_backprop() the rule is not backprop
            plain_rule = traverse_util.flatten_dict(
                grads_of(model, variables, rngs={"feedback": jax.random.key(0)}), sep="/")
            assert not np.allclose(plain_rule["attn_0/query/kernel"],
                                   want["attn_0/query/kernel"]), rule


def test_feedback_points_that_match_nothing_name_the_module_paths():
    with pytest.raises(ValueError, match=r"feedback point 'Blok_\*' matches no module; the "
                                         r"module paths are \['embed', 'Block_0', "):
        convert(BlockNet(), "dfa", feedback_points=["Blok_*"]).init(
            jax.random.key(0), jnp.zeros((2, 6)))
    with pytest.raises(ValueError, match="feedback_points are DFA's"):
        convert(BlockNet(), "fa", feedback_points=["Block_*"])


def test_dfa_refuses_an_input_whose_leading_axes_are_not_the_outputs():
    class Pooled(nn.Module):  # (batch, 2, 3) output; the second layer reads (batch, 4, 5)
        @nn.compact
        def __call__(self, x):
            h = jnp.tanh(nn.Dense(5)(jnp.tanh(nn.Dense(5)(x))))
            return nn.Dense(3)(h[:, ::2])

    with pytest.raises(ValueError, match=r"layer 'Dense_0' reads an input of shape "
                                         r"\(2, 4, 5\), whose leading axes are not those of "
                                         r"the model's output \(2, 2, 3\)"):
        convert(Pooled(), "dfa").init(jax.random.key(0), jnp.zeros((2, 4, 6)))
