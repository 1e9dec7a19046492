"""The examples of the README and of docs/rules.md and docs/convert.md run verbatim and
train by the rules they name."""

import pathlib
import re

import jax
import numpy as np
import optax
from flax import nnx

import bioflax

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RULES, CONVERT = ROOT / "docs" / "rules.md", ROOT / "docs" / "convert.md"


def example(page: pathlib.Path, heading: str) -> str:
    """The first Python block after ``heading`` in ``page``."""
    section = page.read_text(encoding="utf-8").split(heading, 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def run(page: pathlib.Path, heading: str) -> dict:
    namespace: dict = {}
    exec(compile(example(page, heading), str(page), "exec"),  # pylint: disable=exec-used
         namespace)
    return namespace


def test_readme_quickstart_trains_the_users_cnn_by_kp(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = run(README, "## Quickstart")
    printed = capsys.readouterr().out
    assert re.search(r"Conv_0\s+Conv \(xla\)\s+kp\n", printed)
    assert re.search(r"Dense_0\s+Dense\s+kp\n", printed)
    history = namespace["result"].history
    assert len(history) == 5 and printed.count("epoch ") >= 5
    # Four classes: chance is 0.25; the KP-trained CNN learns the task.
    assert history[-1]["val/accuracy"] > 0.6
    # KP's B received W's updates: W − B is what it was at init (both moved by the same
    # updates), B itself moved.
    params = namespace["result"].state.params
    kernel, feedback = params["Conv_0"]["kernel"], params["Conv_0"]["feedback_kernel"]
    init = namespace["trainer"].init_state(namespace["task"], namespace["x"][:1]).params
    np.testing.assert_allclose(kernel - feedback,
                               init["Conv_0"]["kernel"] - init["Conv_0"]["feedback_kernel"],
                               atol=1e-5)
    assert not np.allclose(feedback, init["Conv_0"]["feedback_kernel"], atol=1e-3)


def test_the_layer_example_of_rules_md_runs_and_its_rules_differ_from_backprop(capsys):
    namespace = run(RULES, "## The layers")
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in printed] == ["FANet", "KPNet", "DFANet"]
    for net_name in ("FANet", "KPNet", "DFANet"):
        net = namespace[net_name]()
        x, labels = namespace["x"], namespace["labels"]
        variables = net.init(jax.random.key(1), x)
        params = variables["params"]
        fixed = {k: v for k, v in variables.items() if k != "params"}

        def loss(params, net=net, fixed=fixed):
            logits = net.apply({"params": params, **fixed}, x)
            return namespace["optax"].softmax_cross_entropy_with_integer_labels(
                logits, labels).mean()

        rule = jax.grad(loss)(params)
        with bioflax.exact_backprop():
            backprop = jax.grad(loss)(params)
        first_layer = sorted(rule)[0]
        # The first layer learns through B, not W: its update differs from backprop's.
        assert not np.allclose(rule[first_layer]["kernel"], backprop[first_layer]["kernel"])
        # The output layer is trained by the output error under every rule.
        last_layer = sorted(rule)[-1]
        np.testing.assert_allclose(rule[last_layer]["kernel"], backprop[last_layer]["kernel"],
                                   rtol=1e-5, atol=1e-7)


def test_the_convert_example_of_convert_md_runs_and_trains_convs_by_kp(capsys):
    namespace = run(CONVERT, "# Converting a model")
    summary = capsys.readouterr().out.splitlines()
    # every layer with parameters (Dropout has none), in call order
    # (columns: path, class with a Conv layer's convolution, rule)
    assert [re.split(r"\s{2,}", line.strip()) for line in summary[2:-1]] == [
        ["Conv_0", "Conv (xla)", "kp"], ["BatchNorm_0", "BatchNorm", "bp (not a converted layer class)"],
        ["Dense_0", "Dense", "bp"]]
    grads, variables = namespace["grads"], namespace["variables"]
    # KP: B receives exactly W's update; the output layer has no B
    np.testing.assert_array_equal(grads["Conv_0"]["feedback_kernel"], grads["Conv_0"]["kernel"])
    assert set(variables["params"]["Dense_0"]) == {"kernel", "bias"}


def test_the_nnx_example_of_convert_md_trains_the_conv_by_the_error_sent_through_b(capsys):
    """The conv's FA gradient, by hand: the linear layer's input receives δ Bᵀ, pulled back
    through the plain forward pass of max-pool, ReLU, BatchNorm and the convolution."""
    namespace = run(CONVERT, "## Flax NNX models")
    losses = [float(line.rsplit(maxsplit=1)[-1]) for line in capsys.readouterr().out.splitlines()]
    assert len(losses) == 3 and losses[-1] < losses[0]
    model, x, labels = namespace["model"], namespace["x"], namespace["labels"]
    model.eval()  # dropout off, BatchNorm on its running statistics: deterministic
    inner = model.module
    kernel, bias = inner.linear.kernel[...], inner.linear.bias[...]
    feedback = inner.linear.feedback_kernel[...]

    def features(conv_kernel):
        y = jax.lax.conv_general_dilated(x, conv_kernel, (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        y = nnx.max_pool(nnx.relu(inner.norm(y + inner.conv.bias[...])), (2, 2), (2, 2))
        return y.reshape((x.shape[0], -1))

    def cross_entropy(logits):
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    h, pull_back = jax.vjp(features, inner.conv.kernel[...])
    delta = jax.grad(cross_entropy)(h @ kernel + bias)
    (expected,) = pull_back(delta @ feedback.T)
    grads = nnx.grad(lambda m: cross_entropy(m(x)))(model)
    np.testing.assert_allclose(grads["module"]["conv"]["kernel"][...], expected,
                               rtol=1e-4, atol=1e-6)
    with bioflax.exact_backprop():
        backprop = nnx.grad(lambda m: cross_entropy(m(x)))(model)
    assert not np.allclose(backprop["module"]["conv"]["kernel"][...], expected, atol=1e-6)
