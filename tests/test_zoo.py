"""The model zoo against hand-derived architecture facts (biotorch 74fad0d, He et al. 2016)
and against the outputs of biotorch's own PyTorch modules (tests/data/biotorch_reference.py).

Variables are built from shapes (``jax.eval_shape``) and NumPy values wherever the test is
not about initialisation: compiling JAX's random initialisers costs seconds per shape here.
"""

import functools
import importlib.util
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from bioflax import zoo

REFERENCE = pathlib.Path(__file__).parent / "data" / "biotorch_reference.py"
_spec = importlib.util.spec_from_file_location("biotorch_reference", REFERENCE)
biotorch_reference = importlib.util.module_from_spec(_spec)  # NumPy only: reference weights
_spec.loader.exec_module(biotorch_reference)
MNIST = (32, 32, 1)
CIFAR = (32, 32, 3)


def _shapes(model, shape, batch=2):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((batch, *shape)),
                                             train=False))


def _numpy_variables(model, shape, seed=0):
    """He-scaled normal kernels, small biases, BN at scale 1 / bias 0, stats mean 0 / var 1."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            return rng.normal(0, math.sqrt(2 / math.prod(leaf.shape[:-1])), leaf.shape)
        if name in ("scale", "var"):
            return np.ones(leaf.shape)
        return rng.normal(0, 0.01, leaf.shape) if name == "bias" else np.zeros(leaf.shape)

    tree = jax.tree_util.tree_map_with_path(fill, _shapes(model, shape))
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)


def _apply(model, variables, x, train):
    mutable = ["batch_stats"] if train and "batch_stats" in variables else False
    return jax.jit(functools.partial(model.apply, train=train, mutable=mutable))(variables, x)


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
    variables = _shapes(model, shape, batch=3)
    out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((3, *shape)), train=False), variables)
    assert out.shape == (3, classes)


def test_lenet5_layers_are_biotorchs():
    params = _shapes(zoo.get_model("lenet5"), MNIST)["params"]
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
    # CONV_32_5_1_2_FC_1000_FC_10 on 28×28: the conv keeps 28×28, the pool halves it.
    ("drtp_conv", (28, 28, 1), (25 * 32 + 32) + (14 * 14 * 32 * 1000 + 1000) + (1000 * 10 + 10)),
    ("pepita_mlp", (28, 28, 1), 784 * 1024 + 1024 * 10),  # no biases
])
def test_parameter_count(name, shape, expected):
    assert _count(_shapes(zoo.get_model(name), shape)["params"]) == expected


def test_resnet_counts_match_the_paper():
    # He et al. 2016 Table 6: ResNet-20 0.27M, ResNet-56 0.85M parameters.
    assert _resnet_param_count(3, 10) == 269_722
    assert _resnet_param_count(9, 10) == 853_018


def test_batch_stats_only_for_resnets():
    assert set(_shapes(zoo.get_model("lenet5"), MNIST)) == {"params"}
    variables = _shapes(zoo.get_model("resnet20"), CIFAR)
    assert set(variables) == {"params", "batch_stats"}
    # One BN after the stem, two per block: 16 + 3·2·(16 + 32 + 64) channels, mean and var.
    assert _count(variables["batch_stats"]) == 2 * (16 + 3 * 2 * (16 + 32 + 64))


def test_default_init_is_biotorchs_xavier_uniform():
    block = zoo.BasicBlock(planes=64, strides=2)
    variables = jax.jit(functools.partial(block.init, train=False))(
        jax.random.key(1), jnp.zeros((1, 8, 8, 32)))
    params = variables["params"]
    for name, fan_in, fan_out in (("conv1", 9 * 32, 9 * 64), ("conv2", 9 * 64, 9 * 64)):
        bound = math.sqrt(6 / (fan_in + fan_out))
        kernel = params[name]["kernel"]
        assert float(jnp.abs(kernel).max()) <= bound
        assert float(jnp.std(kernel)) == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert np.all(params["bn1"]["scale"] == 1) and np.all(params["bn1"]["bias"] == 0)
    stats = variables["batch_stats"]["bn2"]
    assert np.all(stats["mean"] == 0) and np.all(stats["var"] == 1)


@pytest.mark.parametrize("name, shape", [("lenet5", MNIST), ("lenet_cifar", CIFAR),
                                         ("resnet20", CIFAR)])
def test_every_layer_takes_kernel_init_and_zero_biases(name, shape):
    model = zoo.get_model(name, kernel_init=nn.initializers.constant(0.5))
    params = jax.jit(functools.partial(model.init, train=False))(
        jax.random.key(0), jnp.zeros((1, *shape)))["params"]
    flat = jax.tree_util.tree_leaves_with_path(params)
    kernels = [leaf for path, leaf in flat if path[-1].key == "kernel"]
    biases = [leaf for path, leaf in flat if path[-1].key == "bias" and "bn" not in str(path)]
    assert len(kernels) == (5 if name.startswith("lenet") else 20)
    assert all(np.all(k == 0.5) for k in kernels) and all(np.all(b == 0) for b in biases)


def test_train_and_eval_differ_under_batchnorm():
    model = zoo.CifarResNet(depth=8)
    x = jax.random.normal(jax.random.key(2), (4, *CIFAR)) * 3 + 1
    variables = _numpy_variables(model, CIFAR)
    run_eval = jax.jit(functools.partial(model.apply, train=False))
    run_train = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))
    eval_out = run_eval(variables, x)
    train_out, updates = run_train(variables, x)
    assert not np.allclose(eval_out, train_out, atol=1e-3)
    # Training mode moves the running mean 0.1 of the way to the batch mean (PyTorch's 0.1).
    stem = jax.lax.conv_general_dilated(x, variables["params"]["conv1"]["kernel"], (1, 1),
                                        ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(updates["batch_stats"]["bn1"]["mean"],
                               0.1 * stem.mean((0, 1, 2)), atol=1e-5)
    # In eval mode a sample's logits do not depend on the rest of the batch; in train they do.
    others_changed = x.at[2:].set(0.5 - 2 * x[2:])
    np.testing.assert_allclose(run_eval(variables, others_changed)[:2], eval_out[:2], atol=1e-5)
    assert not np.allclose(run_train(variables, others_changed)[0][:2], train_out[:2], atol=1e-3)


@pytest.mark.parametrize("shape", [(2, 28, 28, 3), (1, 13, 7, 2)])
def test_max_pool_equals_flax_max_pool(shape):
    x = jnp.asarray(np.random.default_rng(0).standard_normal(shape, dtype=np.float32))
    np.testing.assert_array_equal(zoo.max_pool(x), nn.max_pool(x, (2, 2), strides=(2, 2)))


def test_max_pool_gradient_goes_to_each_window_first_maximum():
    # One 2x2 window per output pixel: gradient g at the maximum; at a tie, all of it to the
    # first maximum in row-major order (PyTorch's max_pool2d does the same).
    x = jnp.asarray([[1.0, 4.0, 2.0, 2.0], [3.0, 0.0, -1.0, -5.0],
                     [0.0, 1.0, 6.0, 0.0], [1.0, 0.0, 6.0, 6.0]]).reshape(1, 4, 4, 1)
    g = jnp.asarray([[3.0, 5.0], [7.0, 11.0]])[None, :, :, None]
    grad = jax.grad(lambda x: jnp.sum(zoo.max_pool(x) * g))(x)
    np.testing.assert_array_equal(grad.reshape(4, 4), [[0.0, 3.0, 5.0, 0.0],
                                                       [0.0, 0.0, 0.0, 0.0],
                                                       [0.0, 7.0, 11.0, 0.0],
                                                       [0.0, 0.0, 0.0, 0.0]])


@pytest.mark.parametrize("shape,size", [((2, 8, 8, 3), 2), ((1, 13, 7, 2), 2), ((2, 9, 10, 2), 3)])
def test_max_pool_gradient_equals_flax_max_pool_with_ties(shape, size):
    # Integer-valued inputs tie often; nn.max_pool's select-and-scatter is the reference.
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.integers(-2, 3, shape).astype(np.float32))
    g = jnp.asarray(rng.standard_normal(
        (shape[0], shape[1] // size, shape[2] // size, shape[3]), dtype=np.float32))
    ours = jax.grad(lambda x: jnp.sum(zoo.max_pool(x, size) * g))(x)
    flax_grad = jax.grad(
        lambda x: jnp.sum(nn.max_pool(x, (size, size), strides=(size, size)) * g))(x)
    np.testing.assert_array_equal(ours, flax_grad)


def test_layers_in_call_order_end_with_the_output_layer():
    from bioflax import alignment as alignment_lib  # pylint: disable=import-outside-toplevel
    assert alignment_lib.layers_in_call_order(zoo.LeNet5(), jnp.zeros((1, *MNIST))) == [
        "conv1", "conv2", "conv3", "fc1", "fc2"]
    order = alignment_lib.layers_in_call_order(zoo.get_model("resnet20"), jnp.zeros((1, *CIFAR)))
    assert order[:3] == ["conv1", "layer1_0/conv1", "layer1_0/conv2"] and order[-1] == "fc"
    assert len(order) == 20  # 19 convolutions and the classifier


def test_shortcut_a_is_strided_zero_padding():
    x = np.arange(2 * 4 * 4 * 3, dtype=np.float32).reshape(2, 4, 4, 3)
    expected = np.zeros((2, 2, 2, 3 + 2 * 2), np.float32)
    for i in range(2):
        for j in range(2):
            expected[:, i, j, 2:5] = x[:, 2 * i, 2 * j, :]
    np.testing.assert_array_equal(zoo.shortcut_a(jnp.asarray(x), planes=8), expected)


def test_downsampling_block_adds_option_a_shortcut():
    # With zero kernels the residual branch is BN(0) = 0, so the block is ReLU(shortcut).
    x = jax.random.uniform(jax.random.key(5), (2, 6, 6, 4))
    block = zoo.BasicBlock(planes=8, strides=2)
    variables = _numpy_variables(block, (6, 6, 4))
    variables = {**variables, "params": jax.tree.map(jnp.zeros_like, variables["params"])}
    expected = np.zeros((2, 3, 3, 8), np.float32)
    expected[..., 2:6] = np.asarray(x)[:, ::2, ::2, :]
    np.testing.assert_allclose(_apply(block, variables, x, train=False), expected)


def test_strided_conv_is_centred_on_the_shortcut_pixel():
    # Centre-tap identity kernels make the residual branch copy its input (scaled by the eval
    # BN's 1/sqrt(1 + eps) twice); PyTorch's padding=1 centres the stride-2 window on x[2i, 2j].
    x = jax.random.uniform(jax.random.key(6), (1, 6, 6, 4))
    block = zoo.BasicBlock(planes=8, strides=2)
    variables = _numpy_variables(block, (6, 6, 4))
    delta1 = np.zeros((3, 3, 4, 8), np.float32)
    delta1[1, 1, np.arange(4), np.arange(4)] = 1
    delta2 = np.zeros((3, 3, 8, 8), np.float32)
    delta2[1, 1, np.arange(8), np.arange(8)] = 1
    params = {**variables["params"], "conv1": {"kernel": delta1}, "conv2": {"kernel": delta2}}
    params = {**params, "bn1": {"scale": np.ones(8), "bias": np.zeros(8)},
              "bn2": {"scale": np.ones(8), "bias": np.zeros(8)}}
    sub = np.asarray(x)[:, ::2, ::2, :]
    expected = np.zeros((1, 3, 3, 8), np.float32)
    expected[..., 0:4] += sub / (1 + 1e-5)
    expected[..., 2:6] += sub
    out = _apply(block, {**variables, "params": params}, x, train=False)
    np.testing.assert_allclose(out, expected, rtol=1e-5)


@pytest.mark.parametrize("model, shape", [(zoo.LeNet5(), MNIST), (zoo.CifarResNet(depth=8), CIFAR)])
def test_one_jitted_backprop_step_reduces_loss(model, shape):
    x = jax.random.normal(jax.random.key(7), (8, *shape))
    labels = jnp.arange(8) % 10
    variables = _numpy_variables(model, shape)
    params, state = variables["params"], {k: v for k, v in variables.items() if k != "params"}

    def loss_fn(params):
        logits, new_state = model.apply({"params": params, **state}, x, train=True,
                                        mutable=list(state))
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), new_state

    value_and_grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    (before, new_state), grads = value_and_grad(params)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    step = 0.05 / optax.global_norm(grads)  # a short step along -∇L: first order decreases L
    params = optax.apply_updates(params, jax.tree.map(lambda g: -step * g, grads))
    (after, _), _ = value_and_grad(params)
    assert float(after) < float(before)


def test_unknown_names_and_depths_are_rejected():
    with pytest.raises(ValueError, match="resnet20"):
        zoo.get_model("resnet21")
    with pytest.raises(ValueError, match="6n \\+ 2"):
        _shapes(zoo.CifarResNet(depth=21), CIFAR)


def _from_biotorch(network):
    """Variables of a zoo model holding the weights biotorch's module had in the reference."""
    data = np.load(REFERENCE.with_suffix(".npz"))
    variables = {}
    for name in data[f"{network}/names"]:
        value = biotorch_reference.values(network, name, tuple(data[f"{network}/shape/{name}"]))
        parts = name.split(".")
        if parts[0].startswith("layer"):  # layer2.1.conv1.weight → layer2_1/conv1/kernel
            parts = [f"{parts[0]}_{parts[1]}", *parts[2:]]
        *modules, leaf = parts
        collection, leaf = {"running_mean": ("batch_stats", "mean"),
                            "running_var": ("batch_stats", "var")}.get(leaf, ("params", leaf))
        if leaf == "weight":  # OIHW → HWIO, (out, in) → (in, out); 1-D: BatchNorm scale
            leaf = "kernel" if value.ndim > 1 else "scale"
            value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
        node = variables.setdefault(collection, {})
        for module in modules:
            node = node.setdefault(module, {})
        node[leaf] = jnp.asarray(value)
    return variables, data


@pytest.mark.parametrize("network, model", [
    ("lenet5", zoo.LeNet5()), ("lenet_cifar", zoo.LeNetCIFAR()),
    ("resnet14", zoo.CifarResNet(depth=14)),
])
def test_same_outputs_as_biotorchs_modules(network, model):
    variables, data = _from_biotorch(network)
    x = jnp.asarray(biotorch_reference.inputs(network).transpose(0, 2, 3, 1))
    np.testing.assert_allclose(_apply(model, variables, x, train=False), data[f"{network}/eval"],
                               rtol=1e-4, atol=1e-4)
    logits = _apply(model, variables, x, train=True)
    if "batch_stats" not in variables:
        np.testing.assert_allclose(logits, data[f"{network}/train"], rtol=1e-4, atol=1e-4)
        return
    logits, updates = logits
    np.testing.assert_allclose(logits, data[f"{network}/train"], rtol=1e-4, atol=1e-4)
    for path, new in jax.tree_util.tree_leaves_with_path(updates["batch_stats"]):
        *modules, leaf = [p.key for p in path]
        torch_name = ".".join(m.replace("_", ".") for m in modules)
        expected = data[f"{network}/after_train/{torch_name}.running_{leaf}"]
        if leaf == "var":  # PyTorch averages the unbiased batch variance, Flax the biased one
            old = variables["batch_stats"]
            for m in modules:
                old = old[m]
            stage = int(modules[0][5]) if modules[0].startswith("layer") else 1
            n = x.shape[0] * (32 // 2 ** (stage - 1)) ** 2
            expected = 0.9 * old["var"] + (expected - 0.9 * old["var"]) * (n - 1) / n
        np.testing.assert_allclose(new, expected, rtol=1e-5, atol=1e-6, err_msg=torch_name)
