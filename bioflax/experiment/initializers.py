"""Weight initialisers, chosen by name from :data:`INITIALIZERS`: each entry maps a scale
``s`` to a Flax initialiser."""

from typing import Callable

import jax
from flax import linen as nn


def _uniform(scale: float) -> nn.initializers.Initializer:
    """U[−s, s]."""
    return lambda key, shape, dtype=jax.numpy.float32: jax.random.uniform(
        key, shape, dtype, -scale, scale)


INITIALIZERS: dict[str, Callable[[float], nn.initializers.Initializer]] = {
    "lecun_normal": lambda scale: nn.initializers.lecun_normal(),
    "uniform": _uniform,
    # U[−s/√fan_in, s/√fan_in] (s = 1: PyTorch's nn.Linear default); variance_scaling's
    # uniform bound is √(3·v/fan_in), so v = s²/3.
    "fan_in_uniform": lambda scale: nn.initializers.variance_scaling(
        scale ** 2 / 3, "fan_in", "uniform"),
    # Truncated normal of variance s/fan_in.
    "variance_scaling": lambda scale: nn.initializers.variance_scaling(
        scale, "fan_in", "truncated_normal"),
    "zeros": lambda scale: nn.initializers.zeros,
    # U[−a, a], a = s·√(6/(fan_in + fan_out)) (s = 1: Glorot & Bengio; biotorch's "xavier").
    "xavier_uniform": lambda scale: nn.initializers.variance_scaling(
        scale ** 2, "fan_avg", "uniform"),
}


def get(name: str, scale: float = 1.0) -> nn.initializers.Initializer:
    """The initialiser ``name`` with scale ``scale``; ValueError naming the choices for an
    unknown name."""
    if name not in INITIALIZERS:
        raise ValueError(f"Unknown initializer {name!r}; choose one of {list(INITIALIZERS)}.")
    return INITIALIZERS[name](scale)
