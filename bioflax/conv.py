"""A convolution that XLA's CPU backend trains fast inside ``lax.scan``: a banded matmul.

:func:`conv` computes exactly what ``flax.linen.Conv`` computes without its bias (a
``lax.conv_general_dilated`` with the input channels last and an ``(*window, in / groups,
out)`` kernel), as one matrix product whose gradients autodiff derives as matrix
products and slices, never as XLA's backward convolutions, which XLA's CPU backend runs in
a slow layout inside a compiled loop (jax-ml/jax#12868).

Along the last spatial axis the output is cut into blocks of ``b`` neighbouring columns.
Each block reads ``win = (b − 1)·s + (k − 1)·d + 1`` input columns (stride ``s``, kernel
width ``k``, dilation ``d``), under each tap of the other spatial axes: the block's patch
``P``, of length ``taps · win · in``. The kernel becomes the banded matrix

    T[t, p, c, j, o] = Σ_v [p = j·s + v·d] · W[t, v, c, o]      (``(taps·win·in, b·out)``)

and ``y_block = P @ T`` gives the block's ``b`` output columns at once. ``b = 1`` is plain
im2col; larger blocks share each input column among the ``b`` outputs that read it, so the
patches are ``b·k / win`` times smaller than im2col's (about ``k / 2`` for ``b = k``) at
``win / k`` times its multiply-adds (about 2). The gradients are autodiff's: ``dT = Pᵀ δ``
summed back onto ``W``'s entries, and ``δ Tᵀ`` added back onto the input's pixels, so a
feedback rule's ``jax.vjp(lambda h: conv(h, B), x)`` is the same convolution's
input-gradient with ``B`` in place of ``W``.
"""

import itertools
from typing import NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp
from flax.linen.linear import canonicalize_padding
from jax import lax

PaddingLike = Union[str, int, Sequence[Union[int, tuple[int, int]]]]
IntOrSequence = Union[int, Sequence[int]]

# XLA options for training these convolutions on a CPU (``jax.jit``'s ``compiler_options``;
# ``config.compiler_options`` of the LeNet configs): YNNPACK for reductions only, so that
# XLA's own matmuls, faster on the banded products' skinny shapes, run them.
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


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
    """``flax.linen.Conv``'s convolution (no bias) as a banded matmul (module docstring).

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


def _blocks(width: int, k: int, stride: int, dilation: int) -> tuple[int, int]:
    """``(b, count)``: output columns per block and blocks along an axis of ``width``
    outputs. A block is at most ``⌈k·d / s⌉`` columns wide (patches about ``k / 2`` times
    smaller than im2col's for twice its multiply-adds); the blocks split the width evenly."""
    widest = max(1, -(-k * dilation // stride))
    count = -(-width // widest)
    return -(-width // count), count


def _band(kernel: jax.Array, block: int, win: int, stride: int, dilation: int) -> jax.Array:
    """``T[t, p, c, j, o] = Σ_v [p = j·s + v·d] W[t, v, c, o]`` for a kernel reshaped to
    ``(taps, k, in, out)``: shape ``(taps, win, in, block, out)``. Output column ``j``'s
    slice is ``W`` along its window axis, dilated by ``d`` and shifted by ``j·s``: one
    ``lax.pad``, whose gradient is a slice (cheaper than a matmul against the 0/1
    selection the equation reads)."""
    span = (kernel.shape[1] - 1) * dilation + 1
    zero = jnp.zeros((), kernel.dtype)
    return jnp.stack([lax.pad(kernel, zero, [(0, 0, 0), (j * stride, win - span - j * stride,
                                                          dilation - 1), (0, 0, 0), (0, 0, 0)])
                      for j in range(block)], axis=-2)


def _conv(x, kernel, spec: _Spec):
    """The banded-matmul convolution of the module docstring."""
    *window, in_per_group, out = kernel.shape
    groups = spec.groups
    out_spatial = _out_shape(x.shape, window, spec)
    k, s, d = window[-1], spec.strides[-1], spec.dilation[-1]
    block, count = _blocks(out_spatial[-1], k, s, d)
    win = (block - 1) * s + (k - 1) * d + 1
    pads = list(spec.padding)
    needed = (count * block - 1) * s + (k - 1) * d + 1
    lo, hi = pads[-1]
    pads[-1] = (lo, hi + max(0, needed - (x.shape[-2] + lo + hi)))
    zero = jnp.zeros((), x.dtype)
    xp = lax.pad(x, zero, [(0, 0, 0)] + [(a, b, 0) for a, b in pads] + [(0, 0, 0)])
    taps = []  # the input under each tap of the leading spatial axes
    for offset in itertools.product(*map(range, window[:-1])):
        start = [o * dd for o, dd in zip(offset, spec.dilation[:-1])]
        limit = [b + (m - 1) * st + 1
                 for b, m, st in zip(start, out_spatial[:-1], spec.strides[:-1])]
        taps.append(lax.slice(xp, (0, *start, 0, 0), (xp.shape[0], *limit, *xp.shape[-2:]),
                              (1, *spec.strides[:-1], 1, 1)))
    rows = jnp.stack(taps, axis=-3)  # (batch, *out_spatial[:-1], taps, width, in)
    patches = jnp.stack([rows[..., i * block * s:i * block * s + win, :] for i in range(count)],
                        axis=-4)  # (batch, *out_spatial[:-1], count, taps, win, in)
    n_taps = len(taps)
    band = _band(kernel.reshape(n_taps, k, in_per_group, out), block, win, s, d)
    lead = patches.shape[:-3]
    if groups == 1:
        y = (patches.reshape(-1, n_taps * win * in_per_group)
             @ band.reshape(n_taps * win * in_per_group, block * out))
    else:
        p = patches.reshape(-1, n_taps, win, groups, in_per_group)
        t = band.reshape(n_taps, win, in_per_group, block, groups, out // groups)
        y = jnp.einsum("mtpgc,tpcjgo->mjgo", p, t)
    y = y.reshape(*lead[:-1], count * block, out)
    return y[..., :out_spatial[-1], :]


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
