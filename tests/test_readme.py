"""The README's layer example runs verbatim and trains by the rules it names."""

import pathlib
import re

import jax
import numpy as np

import bioflax

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    text = README.read_text()
    section = text.split("## Using the layers in your own model", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_layer_example_runs_and_its_rules_differ_from_backprop(capsys):
    namespace: dict = {}
    exec(compile(readme_example(), str(README), "exec"), namespace)  # pylint: disable=exec-used
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


def convert_example() -> str:
    section = README.read_text().split("## Any Flax model, any rule", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_convert_example_runs_and_trains_convs_by_kp(capsys):
    namespace: dict = {}
    exec(compile(convert_example(), str(README), "exec"), namespace)  # pylint: disable=exec-used
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
