"""``bioflax.conv.conv`` against ``lax.conv_general_dilated`` in float64: its value, and
both VJPs (with respect to the input and to the kernel) for random cotangents."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax import lax

from bioflax.conv import conv
from float64 import ATOL, RTOL, float64_only  # noqa: F401

CASES = {
    # name: (input shape, kernel shape, conv keyword arguments)
    "stride2_same": ((2, 9, 11, 4), (3, 3, 4, 6), dict(strides=2, padding="SAME")),
    "valid_odd": ((3, 7, 9, 3), (5, 3, 3, 4), dict(padding="VALID")),
    "dilation2": ((2, 11, 10, 3), (3, 3, 3, 5), dict(padding="SAME", kernel_dilation=2)),
    "groups2": ((2, 8, 7, 4), (3, 2, 2, 6), dict(padding="VALID", feature_group_count=2)),
    "groups2_stride2_dilation2": ((1, 13, 12, 6), (3, 3, 3, 4),
                                  dict(strides=2, padding="SAME", kernel_dilation=2,
                                       feature_group_count=2)),
    "explicit_pads": ((3, 10, 10, 3), (5, 5, 3, 4),
                      dict(padding=((1, 2), (0, 3)), strides=(1, 2))),
    "negative_pads": ((2, 9, 9, 2), (3, 3, 2, 3), dict(padding=((-1, 0), (1, -2)))),
    "batch1_same_lower": ((1, 6, 5, 2), (4, 4, 2, 3), dict(padding="SAME_LOWER")),
    "lenet_conv1": ((2, 32, 32, 1), (5, 5, 1, 6), dict(padding="VALID")),
    "conv1d": ((2, 15, 3), (4, 3, 5), dict(strides=3, padding="SAME")),
    "conv3d": ((1, 5, 6, 4, 2), (2, 3, 2, 2, 4), dict(padding="VALID", strides=(1, 2, 1))),
}


def reference(x, kernel, strides=1, padding="SAME", kernel_dilation=1, feature_group_count=1):
    n = x.ndim - 2
    as_tuple = lambda v: (v,) * n if isinstance(v, int) else tuple(v)  # noqa: E731
    spatial = "DHW"[3 - n:]
    numbers = ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C")
    return lax.conv_general_dilated(x, kernel, as_tuple(strides), padding,
                                    rhs_dilation=as_tuple(kernel_dilation),
                                    dimension_numbers=numbers,
                                    feature_group_count=feature_group_count)


@pytest.mark.parametrize("name", sorted(CASES))
def test_value_and_both_vjps_equal_lax(name):
    x_shape, k_shape, kwargs = CASES[name]
    rng = np.random.default_rng(sorted(CASES).index(name))
    x = jnp.asarray(rng.standard_normal(x_shape))
    kernel = jnp.asarray(rng.standard_normal(k_shape))
    assert x.dtype == jnp.float64
    y, vjp = jax.vjp(lambda x, k: conv(x, k, **kwargs), x, kernel)
    y_ref, vjp_ref = jax.vjp(lambda x, k: reference(x, k, **kwargs), x, kernel)
    np.testing.assert_allclose(y, y_ref, rtol=RTOL, atol=ATOL)
    dy = jnp.asarray(rng.standard_normal(y.shape))
    for got, want in zip(vjp(dy), vjp_ref(dy)):
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_vjp_with_respect_to_one_argument_as_the_rules_call_it():
    """The input-gradient of ``conv(·, B)`` and the kernel-gradient of ``conv(x, ·)``,
    each taken alone under ``jit``."""
    x_shape, k_shape, kwargs = CASES["groups2_stride2_dilation2"]
    rng = np.random.default_rng(7)
    x, feedback, kernel = (jnp.asarray(rng.standard_normal(s)) for s in (x_shape, k_shape, k_shape))
    dy = jnp.asarray(rng.standard_normal(reference(x, kernel, **kwargs).shape))

    @jax.jit
    def signal_and_dw(x, kernel, feedback, dy):
        signal, = jax.vjp(lambda h: conv(h, feedback, **kwargs), x)[1](dy)
        dw, = jax.vjp(lambda w: conv(x, w, **kwargs), kernel)[1](dy)
        return signal, dw

    signal, dw = signal_and_dw(x, kernel, feedback, dy)
    np.testing.assert_allclose(
        signal, jax.vjp(lambda h: reference(h, feedback, **kwargs), x)[1](dy)[0],
        rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(
        dw, jax.vjp(lambda w: reference(x, w, **kwargs), kernel)[1](dy)[0],
        rtol=RTOL, atol=ATOL)


def test_equals_flax_conv_with_its_padding_forms():
    """The padding forms ``nn.Conv`` accepts (an int, one int per dimension) mean the same."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 8, 9, 3)))
    for padding in (2, (1, 2), "SAME", ((0, 1), (2, 0))):
        layer = nn.Conv(4, (3, 2), strides=(2, 1), padding=padding, use_bias=False,
                        param_dtype=jnp.float64)
        variables = layer.init(jax.random.key(0), x)
        np.testing.assert_allclose(
            conv(x, variables["params"]["kernel"], strides=(2, 1), padding=padding),
            layer.apply(variables, x), rtol=RTOL, atol=ATOL)


def test_rejects_what_it_does_not_compute():
    x, kernel = jnp.zeros((1, 5, 5, 4)), jnp.zeros((3, 3, 4, 2))
    with pytest.raises(ValueError, match="CIRCULAR"):
        conv(x, kernel, padding="CIRCULAR")
    with pytest.raises(ValueError, match="feature_group_count"):
        conv(x, kernel, feature_group_count=2)
    with pytest.raises(ValueError, match="strides"):
        conv(x, kernel, strides=(1, 2, 1))
    with pytest.raises(ValueError, match="rank"):
        conv(x, jnp.zeros((3, 4, 2)))
