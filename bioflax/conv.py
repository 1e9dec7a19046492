"""A convolution whose forward pass and both VJPs run fast inside ``lax.scan`` on XLA:CPU.

:func:`conv` computes exactly what ``flax.linen.Conv`` computes without its bias (a
``lax.conv_general_dilated`` with the input channels last and an ``(*window, in / groups,
out)`` kernel), but differentiates as matrix products on patches (im2col) instead of
through XLA's backward convolutions, which XLA's CPU backend runs in a slow layout inside a
compiled loop (jax-ml/jax#12868): with ``P`` the input's patches, ``(batch · out pixels,
window · in)``,

- the kernel's gradient is ``Pᵀ δ`` (per group);
- the input's gradient is ``δ Wᵀ`` scattered back onto the input's pixels (col2im: a sum of
  padded, strided copies, the transpose of the slices that build ``P``).

``jax.vjp`` of :func:`conv` with respect to either argument takes this path, so a feedback
rule can send down ``jax.vjp(lambda h: conv(h, B), x)[1](δ)`` (the same convolution's
input-gradient with ``B`` in place of ``W``) and ``jax.vjp(lambda w: conv(x, w), W)[1](δ)``
as ``dW``. Forward-mode differentiation (``jax.jvp``) is not defined (a ``custom_vjp``).
"""

import functools
import itertools
from typing import NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp
from flax.linen.linear import canonicalize_padding
from jax import lax

PaddingLike = Union[str, int, Sequence[Union[int, tuple[int, int]]]]
IntOrSequence = Union[int, Sequence[int]]


class _Spec(NamedTuple):
    """The static part of a convolution: explicit padding, strides, dilation, groups."""
    strides: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    dilation: tuple[int, ...]
    groups: int


def _dims(dims: IntOrSequence | None, n: int, name: str) -> tuple[int, ...]:
    if dims is None:
        return (1,) * n
    if isinstance(dims, int):
        return (dims,) * n
    dims = tuple(dims)
    if len(dims) != n:
        raise ValueError(f"{name} needs {n} entries (one per spatial dimension), got {dims}")
    return dims


def conv(x: jax.Array, kernel: jax.Array, *, strides: IntOrSequence | None = None,
         padding: PaddingLike = "SAME", kernel_dilation: IntOrSequence | None = None,
         feature_group_count: int = 1) -> jax.Array:
    """``flax.linen.Conv``'s convolution (no bias), with fast VJPs on XLA:CPU.

    Args:
      x: ``(batch, *spatial, in_features)``.
      kernel: ``(*window, in_features // feature_group_count, out_features)``.
      strides, kernel_dilation: an int or one per spatial dimension (default 1).
      padding: ``'SAME'``, ``'SAME_LOWER'``, ``'VALID'``, an int, or one int or
        ``(low, high)`` pair per spatial dimension, as ``flax.linen.Conv`` takes it
        (``'CIRCULAR'`` and ``'CAUSAL'`` are not supported).
      feature_group_count: groups; divides ``in_features`` and ``out_features``.

    Returns:
      ``(batch, *out_spatial, out_features)``, equal to ``lax.conv_general_dilated(x,
      kernel, strides, padding, rhs_dilation=kernel_dilation, dimension_numbers=(NHWC,
      HWIO, NHWC) generalised, feature_group_count=feature_group_count)``.
    """
    n = x.ndim - 2
    if kernel.ndim != n + 2:
        raise ValueError(f"kernel of rank {kernel.ndim} for an input of rank {x.ndim}")
    strides = _dims(strides, n, "strides")
    dilation = _dims(kernel_dilation, n, "kernel_dilation")
    padding = canonicalize_padding(padding, n)
    if isinstance(padding, str):
        if padding in ("CIRCULAR", "CAUSAL"):
            raise ValueError(f"padding {padding!r} is not supported")
        window = [(k - 1) * d + 1 for k, d in zip(kernel.shape[:n], dilation)]
        padding = lax.padtype_to_pads(x.shape[1:-1], window, strides, padding)
    spec = _Spec(strides, tuple(tuple(p) for p in padding), dilation, feature_group_count)
    if x.shape[-1] != kernel.shape[-2] * feature_group_count:
        raise ValueError(f"input features {x.shape[-1]} != kernel's {kernel.shape[-2]} "
                         f"x feature_group_count {feature_group_count}")
    return _conv(x, kernel, spec)


def _out_shape(x_shape, window, spec: _Spec) -> tuple[int, ...]:
    """Spatial output sizes."""
    return tuple((size + lo + hi - (k - 1) * d - 1) // s + 1
                 for size, (lo, hi), k, d, s in zip(x_shape[1:-1], spec.padding, window,
                                                    spec.dilation, spec.strides))


def _patches(x: jax.Array, window, spec: _Spec) -> jax.Array:
    """``(batch, *out_spatial, prod(window), in_features)``: the input under each tap of the
    window, taps in the kernel's row-major order."""
    zero = jnp.zeros((), x.dtype)
    xp = lax.pad(x, zero, [(0, 0, 0)] + [(lo, hi, 0) for lo, hi in spec.padding] + [(0, 0, 0)])
    out = _out_shape(x.shape, window, spec)
    taps = []
    for offset in itertools.product(*map(range, window)):
        start = [o * d for o, d in zip(offset, spec.dilation)]
        limit = [b + (m - 1) * s + 1 for b, m, s in zip(start, out, spec.strides)]
        taps.append(lax.slice(xp, (0, *start, 0), (xp.shape[0], *limit, xp.shape[-1]),
                              (1, *spec.strides, 1)))
    return jnp.stack(taps, axis=-2)


def _matmul_fwd(patches, kernel, groups):
    """``(batch, *out_spatial, out)`` from patches and the kernel, per group."""
    lead, (taps, c) = patches.shape[:-2], patches.shape[-2:]
    out = kernel.shape[-1]
    if groups == 1:
        y = patches.reshape(-1, taps * c) @ kernel.reshape(taps * c, out)
    else:
        p = patches.reshape(-1, taps, groups, c // groups)
        k = kernel.reshape(taps, c // groups, groups, out // groups)
        y = jnp.einsum("mtgc,tcgo->mgo", p, k)
    return y.reshape(*lead, out)


def _forward(x, kernel, spec):
    patches = _patches(x, kernel.shape[:-2], spec)
    return _matmul_fwd(patches, kernel, spec.groups), patches


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv(x, kernel, spec):
    return _forward(x, kernel, spec)[0]


def _conv_fwd(x, kernel, spec):
    y, patches = _forward(x, kernel, spec)
    return y, (x, kernel, patches)


def _conv_bwd(spec, residuals, dy):
    x, kernel, patches = residuals
    window, groups = kernel.shape[:-2], spec.groups
    taps, c, out = patches.shape[-2], x.shape[-1], kernel.shape[-1]
    dy2 = dy.reshape(-1, out)
    if groups == 1:
        dkernel = (patches.reshape(-1, taps * c).T @ dy2).reshape(kernel.shape)
        dpatches = (dy2 @ kernel.reshape(taps * c, out).T).reshape(patches.shape)
    else:
        p = patches.reshape(-1, taps, groups, c // groups)
        k = kernel.reshape(taps, c // groups, groups, out // groups)
        d = dy2.reshape(-1, groups, out // groups)
        dkernel = jnp.einsum("mtgc,mgo->tcgo", p, d).reshape(kernel.shape)
        dpatches = jnp.einsum("mgo,tcgo->mtgc", d, k).reshape(patches.shape)
    dx, = jax.vjp(lambda h: _patches(h, window, spec), x)[1](dpatches)
    return dx, dkernel


_conv.defvjp(_conv_fwd, _conv_bwd)



def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         **kwargs) -> jax.Array:
    """A drop-in for ``lax.conv_general_dilated`` as ``flax.linen.Conv`` calls it (channels
    last): :func:`conv` where it applies, ``lax`` for input dilation."""
    if lhs_dilation is not None and any(d != 1 for d in lhs_dilation):
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, **kwargs)
    del dimension_numbers, kwargs  # flax.linen.Conv's are channels last, default precision
    return conv(lhs, rhs, strides=window_strides, padding=padding,
                kernel_dilation=rhs_dilation, feature_group_count=feature_group_count)
