"""The model zoo against hand-derived architecture facts (biotorch 74fad0d, He et al. 2016)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bioflax import zoo

MNIST = (32, 32, 1)
CIFAR = (32, 32, 3)


def _variables(model, shape, batch=2):
    """Shapes of the variables only (no compilation)."""
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((batch, *shape)),
                                             train=False))


def _count(tree):
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def _resnet_param_count(n, classes):
    """Conv 3·16·9 + BN; per block two 3×3 convs and two BNs (scale, bias); Dense 64→classes."""
    total = 3 * 16 * 9 + 2 * 16
    in_planes = 16
    for planes in (16, 32, 64):
        for _ in range(n):
            total += in_planes * planes * 9 + planes * planes * 9 + 2 * 2 * planes
            in_planes = planes
    return total + 64 * classes + classes


@pytest.mark.parametrize("name, shape, classes", [
    ("lenet5", MNIST, 10), ("lenet5", MNIST, 7), ("lenet_cifar", CIFAR, 10),
    ("resnet20", CIFAR, 10), ("resnet56", CIFAR, 100),
])
def test_logits_shape(name, shape, classes):
    model = zoo.get_model(name, num_classes=classes)
    variables = _variables(model, shape, batch=3)
    out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((3, *shape)), train=False), variables)
    assert out.shape == (3, classes)


def test_lenet5_layers_are_biotorchs():
    params = _variables(zoo.get_model("lenet5"), MNIST)["params"]
    shapes = {layer: {k: v.shape for k, v in p.items()} for layer, p in params.items()}
    assert shapes == {
        "conv1": {"kernel": (5, 5, 1, 6), "bias": (6,)},
        "conv2": {"kernel": (5, 5, 6, 16), "bias": (16,)},
        "conv3": {"kernel": (5, 5, 16, 120), "bias": (120,)},
        "fc1": {"kernel": (120, 84), "bias": (84,)},
        "fc2": {"kernel": (84, 10), "bias": (10,)},
    }


@pytest.mark.parametrize("name, shape, expected", [
    ("lenet5", MNIST, (25 * 6 + 6) + (25 * 6 * 16 + 16) + (25 * 16 * 120 + 120)
     + (120 * 84 + 84) + (84 * 10 + 10)),
    ("lenet_cifar", CIFAR, (9 * 3 * 32 + 32) + (9 * 32 * 64 + 64) + (9 * 64 * 128 + 128)
     + (128 * 256 + 256) + (256 * 10 + 10)),
    ("resnet20", CIFAR, _resnet_param_count(3, 10)),
    ("resnet32", CIFAR, _resnet_param_count(5, 10)),
    ("resnet56", CIFAR, _resnet_param_count(9, 10)),
])
def test_parameter_count(name, shape, expected):
    assert _count(_variables(zoo.get_model(name), shape)["params"]) == expected


def test_resnet_counts_match_the_paper():
    # He et al. 2016 Table 6: ResNet-20 0.27M, ResNet-56 0.85M parameters.
    assert _resnet_param_count(3, 10) == 269_722
    assert _resnet_param_count(9, 10) == 853_018


def test_batch_stats_only_for_resnets():
    assert set(_variables(zoo.get_model("lenet5"), MNIST)) == {"params"}
    variables = _variables(zoo.get_model("resnet20"), CIFAR)
    assert set(variables) == {"params", "batch_stats"}
    # One BN after the stem, two per block: 16 + 3·2·(16 + 32 + 64) channels, mean and var.
    assert _count(variables["batch_stats"]) == 2 * (16 + 3 * 2 * (16 + 32 + 64))


def test_initialisation_is_biotorchs_xavier():
    variables = zoo.get_model("resnet20").init(jax.random.key(1), jnp.zeros((1, *CIFAR)),
                                               train=False)
    params, stats = variables["params"], variables["batch_stats"]
    bound = math.sqrt(6 / (9 * 32 + 9 * 64))  # layer3_0.conv1: 3×3, 32→64
    kernel = params["layer3_0"]["conv1"]["kernel"]
    assert float(jnp.abs(kernel).max()) <= bound
    assert float(jnp.std(kernel)) == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert np.all(params["fc"]["bias"] == 0)
    assert np.all(params["bn1"]["scale"] == 1) and np.all(params["bn1"]["bias"] == 0)
    assert np.all(stats["bn1"]["mean"] == 0) and np.all(stats["bn1"]["var"] == 1)
    lenet = zoo.get_model("lenet5").init(jax.random.key(1), jnp.zeros((1, *MNIST)))["params"]
    assert all(np.all(layer["bias"] == 0) for layer in lenet.values())


def test_train_and_eval_differ_under_batchnorm():
    model = zoo.get_model("resnet20")
    x = jax.random.normal(jax.random.key(2), (4, *CIFAR)) * 3 + 1
    variables = model.init(jax.random.key(3), x, train=False)
    eval_out = model.apply(variables, x, train=False)
    train_out, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert not np.allclose(eval_out, train_out, atol=1e-3)
    # Training mode moves the running mean 0.1 of the way to the batch mean (PyTorch's 0.1).
    stem = jax.lax.conv_general_dilated(x, variables["params"]["conv1"]["kernel"], (1, 1),
                                        ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert np.allclose(updates["batch_stats"]["bn1"]["mean"], 0.1 * stem.mean((0, 1, 2)),
                       atol=1e-5)
    # In eval mode a sample's logits do not depend on the rest of the batch; in train they do.
    eval_alone = model.apply(variables, x[:1], train=False)
    train_alone, _ = model.apply(variables, x[:2], train=True, mutable=["batch_stats"])
    assert np.allclose(eval_alone, eval_out[:1], atol=1e-5)
    assert not np.allclose(train_alone[:1], train_out[:1], atol=1e-3)


def test_shortcut_a_is_strided_zero_padding():
    x = np.arange(2 * 4 * 4 * 3, dtype=np.float32).reshape(2, 4, 4, 3)
    expected = np.zeros((2, 2, 2, 3 + 2 * 2), np.float32)
    for i in range(2):
        for j in range(2):
            expected[:, i, j, 2:5] = x[:, 2 * i, 2 * j, :]
    np.testing.assert_array_equal(zoo.shortcut_a(jnp.asarray(x), planes=8), expected)


def _block_variables(block, x):
    return block.init(jax.random.key(4), x, train=False)


def test_downsampling_block_adds_option_a_shortcut():
    # With zero kernels the residual branch is BN(0) = 0, so the block is ReLU(shortcut).
    x = jax.random.uniform(jax.random.key(5), (2, 6, 6, 4))
    block = zoo.BasicBlock(planes=8, strides=2)
    variables = _block_variables(block, x)
    variables = {**variables, "params": jax.tree.map(jnp.zeros_like, variables["params"])}
    expected = np.zeros((2, 3, 3, 8), np.float32)
    expected[..., 2:6] = np.asarray(x)[:, ::2, ::2, :]
    np.testing.assert_allclose(block.apply(variables, x, train=False), expected)


def test_strided_conv_is_centred_on_the_shortcut_pixel():
    # Centre-tap identity kernels make the residual branch copy its input (scaled by the eval
    # BN's 1/sqrt(1 + eps) twice); PyTorch's padding=1 centres the stride-2 window on x[2i, 2j].
    x = jax.random.uniform(jax.random.key(6), (1, 6, 6, 4))
    block = zoo.BasicBlock(planes=8, strides=2)
    variables = _block_variables(block, x)
    delta1 = np.zeros((3, 3, 4, 8), np.float32)
    delta1[1, 1, np.arange(4), np.arange(4)] = 1
    delta2 = np.zeros((3, 3, 8, 8), np.float32)
    delta2[1, 1, np.arange(8), np.arange(8)] = 1
    params = {**variables["params"], "conv1": {"kernel": delta1}, "conv2": {"kernel": delta2}}
    sub = np.asarray(x)[:, ::2, ::2, :]
    expected = np.zeros((1, 3, 3, 8), np.float32)
    expected[..., 0:4] += sub / (1 + 1e-5)
    expected[..., 2:6] += sub
    out = block.apply({**variables, "params": params}, x, train=False)
    np.testing.assert_allclose(out, expected, rtol=1e-5)


@pytest.mark.parametrize("name, shape", [("lenet5", MNIST), ("resnet20", CIFAR)])
def test_jit_and_one_backprop_step_reduces_loss(name, shape):
    model = zoo.get_model(name)
    x = jax.random.normal(jax.random.key(7), (8, *shape))
    labels = jnp.arange(8) % 10
    variables = model.init(jax.random.key(8), x, train=False)
    params, state = variables["params"], {k: v for k, v in variables.items() if k != "params"}

    def loss_fn(params):
        logits, new_state = model.apply({"params": params, **state}, x, train=True,
                                        mutable=list(state))
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), new_state

    eager = model.apply(variables, x, train=False)
    np.testing.assert_allclose(jax.jit(model.apply, static_argnames="train")(
        variables, x, train=False), eager, rtol=1e-4, atol=1e-5)
    (before, _), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    params = optax.apply_updates(params, jax.tree.map(lambda g: -0.02 * g, grads))
    after, _ = jax.jit(loss_fn)(params)
    assert float(after) < float(before)


def test_unknown_names_and_depths_are_rejected():
    with pytest.raises(ValueError, match="resnet20"):
        zoo.get_model("resnet21")
    with pytest.raises(ValueError, match="6n \\+ 2"):
        _variables(zoo.CifarResNet(depth=21), CIFAR)
