"""The zoo's Transformers (vit_mnist, transformer_lm) and the harness's sequence path: the
text data set, the per-token loss and accuracy, integer inputs through the trainer, the
config check, and main.py end to end under several rules."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from bioflax import losses, zoo
from bioflax.experiment.errors import ConfigError
from bioflax.experiment import datasets, validate
from bioflax.experiment.configs import text_lm, vit_mnist
from bioflax.trainer import Task, Trainer
from bioflax.trainer import metrics as metrics_lib

from e2e import run_main


def _param_count(model, x):
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes["params"]))


def _vit_count(patch, width, depth, mlp_ratio, classes, pixels=28):
    """By hand: patch conv (p²·1·w + w), class token w, positions (tokens + 1)·w, per block
    2 LayerNorms (2·2w) + q, k, v, out (4·(w² + w)) + MLP (w·rw + rw + rw·w + w), final LN
    2w, head w·classes + classes."""
    tokens = (pixels // patch) ** 2
    hidden = mlp_ratio * width
    block = 4 * width + 4 * (width * width + width) + (2 * width * hidden + hidden + width)
    return ((patch * patch * width + width) + width + (tokens + 1) * width + depth * block
            + 2 * width + width * classes + classes)


@pytest.mark.parametrize("fields, expected", [
    ({}, 105_546),  # the docstring's default
    ({"patch_size": 4, "width": 32, "depth": 2, "num_heads": 2, "num_classes": 7}, None),
])
def test_vit_parameter_count_and_output_shape(fields, expected):
    model = zoo.get_model("vit_mnist", **fields)
    x = jnp.zeros((3, 28, 28, 1))
    defaults = zoo.VisionTransformer()
    get = lambda name: fields.get(name, getattr(defaults, name))
    by_hand = _vit_count(get("patch_size"), get("width"), get("depth"), get("mlp_ratio"),
                         get("num_classes"))
    assert _param_count(model, x) == by_hand == (expected or by_hand)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    out = jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)
    assert out.shape == (3, get("num_classes"))


def test_vit_mean_pooling_reads_the_mean_of_the_tokens_without_a_class_token():
    """``pooling='mean'``: no class token, 16 positions (128 parameters fewer), and the head
    reads LayerNorm of the tokens' mean; an unknown pooling is refused when the model is
    made."""
    model = zoo.get_model("vit_mnist", pooling="mean")
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 28, 28, 1)), jnp.float32)
    assert _param_count(model, x) == 105_546 - 128
    variables = model.init(jax.random.key(0), x, train=False)
    assert "cls_token" not in variables["params"]
    assert variables["params"]["position_embedding"].shape == (1, 16, 64)

    def head_of(block_output):
        p = variables["params"]
        z = block_output.mean(axis=1)
        z = (z - z.mean(-1, keepdims=True)) / np.sqrt(z.var(-1, keepdims=True) + 1e-6)
        z = z * p["ln"]["scale"] + p["ln"]["bias"]
        return z @ p["head"]["kernel"] + p["head"]["bias"]

    _, state = model.apply(variables, x, train=False, capture_intermediates=True)
    last = state["intermediates"]["block2"]["__call__"][0]
    np.testing.assert_allclose(model.apply(variables, x, train=False), head_of(last),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="Unknown pooling 'max'.*'cls', 'mean'"):
        zoo.get_model("vit_mnist", pooling="max")


def test_vit_dropout_uses_the_dropout_stream_only_in_training():
    model = zoo.get_model("vit_mnist", width=16, depth=1, num_heads=2)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 28, 28, 1)), jnp.float32)
    variables = model.init(jax.random.key(0), x, train=False)
    evaluate = model.apply(variables, x, train=False)
    np.testing.assert_array_equal(evaluate, model.apply(variables, x, train=False))
    a, b = (model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(k)})
            for k in (1, 2))
    assert not np.allclose(a, b) and not np.allclose(a, evaluate)


@pytest.mark.parametrize("tie", [False, True])
def test_lm_parameter_count_and_output_shape(tie):
    vocab, width, depth, length = 256, 64, 2, 64
    model = zoo.get_model("transformer_lm", num_classes=vocab, tie_embeddings=tie)
    x = jnp.zeros((3, length), jnp.int32)
    block = 4 * width + 4 * (width * width + width) + (2 * width * 4 * width + 5 * width)
    head = 0 if tie else width * vocab + vocab
    assert _param_count(model, x) == (vocab * width + length * width + depth * block
                                      + 2 * width + head)
    assert _param_count(model, x) == (137_216 if not tie else 137_216 - 16_640)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    out = jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)
    assert out.shape == (3, length, vocab)


@pytest.mark.parametrize("tie", [False, True])
def test_lm_is_causal(tie):
    """Changing the tokens after position t changes no logit at positions <= t, and does
    change the logits after it."""
    model = zoo.get_model("transformer_lm", num_classes=50, width=32, num_heads=4,
                          tie_embeddings=tie)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50, (2, 16)).astype(np.int32)
    variables = model.init(jax.random.key(0), tokens, train=False)
    apply = jax.jit(lambda t: model.apply(variables, t, train=False))
    before = np.asarray(apply(tokens))
    for t in (0, 7, 14):
        changed = tokens.copy()
        later = changed[:, t + 1:]
        changed[:, t + 1:] = (later + 1 + rng.integers(0, 48, later.shape)) % 50  # all differ
        after = np.asarray(apply(changed))
        np.testing.assert_array_equal(after[:, :t + 1], before[:, :t + 1])
        assert np.abs(after[:, t + 1] - before[:, t + 1]).max() > 1e-4


def _text_config(path, **data_fields):
    config = text_lm.get_config()
    config.data.text_path = str(path)
    for name, value in data_fields.items():
        config.data[name] = value
    return config


def _write_text(tmp_path, size=3000):
    words = ["alpha", "beta", "gamma", "δέλτα", "epsilon", "ζ", "eta\n"]
    rng = np.random.default_rng(1)
    text = " ".join(words[i] for i in rng.integers(0, len(words), size // 4))
    path = tmp_path / "text.txt"
    path.write_text(text, encoding="utf-8")
    return path, text


@pytest.mark.parametrize("tokens, stride", [("bytes", None), ("characters", None),
                                            ("bytes", 5)])
def test_text_windows_are_the_hand_sliced_text(tmp_path, tokens, stride):
    path, text = _write_text(tmp_path)
    T = 16
    config = _text_config(path, text_tokens=tokens, context_length=T, text_stride=stride,
                          val_split=0.2, text_test_fraction=0.1)
    info, splits = datasets.load(config.data, seed=0)
    if tokens == "bytes":
        stream, vocabulary = list(text.encode("utf-8")), 256
    else:
        alphabet = sorted(set(text))
        stream, vocabulary = [alphabet.index(c) for c in text], len(alphabet)
    n = len(stream)
    test_start = n - round(0.1 * n)
    val_start = test_start - round(0.2 * test_start)
    step = stride or T
    for name, part in (("train", stream[:val_start]),
                       ("validation", stream[val_start:test_start]),
                       ("test", stream[test_start:])):
        starts = range(0, len(part) - T, step)
        expected_x = np.array([part[s:s + T] for s in starts])
        expected_y = np.array([part[s + 1:s + T + 1] for s in starts])
        split = splits[name]
        assert split.inputs.dtype == split.targets.dtype == np.int32
        np.testing.assert_array_equal(split.inputs, expected_x)
        np.testing.assert_array_equal(split.targets, expected_y)
    assert info == datasets.DatasetInfo("language_modeling", (T,), vocabulary)
    assert datasets.DATASETS["text"].num_outputs(config.data) == vocabulary


def test_token_loss_and_accuracy_average_over_positions_and_respect_the_mask():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4, 5)), jnp.float32)
    labels = jnp.asarray([[0, 1, 2, 3], [4, 4, 4, 4], [1, 1, 1, 1]], jnp.int32)
    per_example = losses.loss_for("language_modeling")(logits, labels)
    by_hand = -np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)),
                                  np.asarray(labels)[..., None], -1)[..., 0].mean(-1)
    np.testing.assert_allclose(per_example, by_hand, rtol=1e-6)
    mask = jnp.asarray([1.0, 1.0, 0.0])
    collection = metrics_lib.COLLECTIONS["language_modeling"].single_from_model_output(
        loss=per_example, logits=logits, labels=labels, mask=mask)
    values = metrics_lib.compute_collection(collection)
    correct = np.asarray(logits.argmax(-1) == labels, np.float64)[:2]
    np.testing.assert_allclose(values["accuracy"], correct.mean(), rtol=1e-6)
    np.testing.assert_allclose(values["loss"], by_hand[:2].mean(), rtol=1e-6)


def test_predict_keeps_integer_inputs_and_returns_sequence_outputs():
    task = Task(module=nn.Embed(11, 3), loss=losses.token_cross_entropy,
                optimizer=optax.sgd(0.1), metrics=metrics_lib.LanguageModelingMetrics)
    trainer = Trainer(max_epochs=1, progress_bar=False)
    tokens = np.random.default_rng(0).integers(0, 11, (7, 5)).astype(np.int32)
    state = trainer.init_state(task, tokens[:1])
    out = trainer.predict(task, state, tokens, batch_size=4)  # nn.Embed refuses floats
    assert out.shape == (7, 5, 3)
    np.testing.assert_allclose(out, np.asarray(state.params["embedding"])[tokens])


def test_config_check_of_the_text_data_set(tmp_path):
    config = text_lm.get_config()
    with pytest.raises(ConfigError, match=r"data\.text_path = None .*text_path=FILE"):
        validate.validate(config)
    config.data.text_path = str(tmp_path / "missing.txt")
    with pytest.raises(ConfigError, match=r"data\.text_path = '.*missing\.txt'"):
        validate.validate(config)
    path, _ = _write_text(tmp_path, size=400)
    config = _text_config(path, context_length=200)
    with pytest.raises(ConfigError, match=r"data\.context_length = 200 .*split"):
        validate.validate(config)
    validate.validate(_text_config(path, context_length=16))
    wrong = _text_config(path, context_length=16)
    wrong.data.dataset = "mnist"
    with pytest.raises(ConfigError, match=r"model\.name = 'transformer_lm'"):
        validate.validate(wrong)
    validate.validate(vit_mnist.get_config("fa"))


# main.py end to end: 3 steps of each config under backprop, FA and DFA (token-wise DFA on
# the language model's (batch, T, vocab) output).
@pytest.mark.e2e
@pytest.mark.parametrize("rule", ["bp", "fa", "dfa"])
def test_text_lm_runs_end_to_end(tmp_path, rule):
    path, _ = _write_text(tmp_path, size=6000)
    result = run_main(f"configs/text_lm.py:{rule}", tmp_path / "run",
                      f"--config.data.text_path={path}", "--config.training.fast_dev_run=3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test/accuracy" in result.stderr + result.stdout


@pytest.mark.e2e
@pytest.mark.parametrize("rule", ["bp", "fa", "dfa"])
def test_vit_mnist_runs_end_to_end(tmp_path, rule):
    result = run_main(f"configs/vit_mnist.py:{rule}", tmp_path / "run",
                      "--config.training.fast_dev_run=3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test/accuracy" in result.stderr + result.stdout
    assert (tmp_path / "run" / "plots" / "test_predictions.png").exists()
