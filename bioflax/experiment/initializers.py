"""Weight initialisers, chosen by name from :data:`INITIALIZERS`: each entry maps a scale
``s`` to a Flax initialiser. Those of :data:`UNSCALED` take no scale: ``s`` must be 1."""

from typing import Callable

import jax
from flax import linen as nn


def _uniform(scale: float) -> nn.initializers.Initializer:
    """U[−s, s]."""
    return lambda key, shape, dtype=jax.numpy.float32: jax.random.uniform(
        key, shape, dtype, -scale, scale)


INITIALIZERS: dict[str, Callable[[float], nn.initializers.Initializer]] = {
    # Truncated normal of variance 1/fan_in (a scaled one is 'variance_scaling').
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

# The initialisers that have no scale; asking for one with s != 1 is an error, not ignored.
UNSCALED = ("lecun_normal", "zeros")


def get(name: str, scale: float = 1.0) -> nn.initializers.Initializer:
    """The initialiser ``name`` with scale ``scale``; ValueError naming the choices for an
    unknown name, and for a scale other than 1 given to an initialiser of :data:`UNSCALED`."""
    if name not in INITIALIZERS:
        raise ValueError(f"Unknown initializer {name!r}; choose one of {list(INITIALIZERS)}.")
    if name in UNSCALED and scale != 1:
        raise ValueError(f"Initializer {name!r} takes no scale (got {scale}); use "
                         "'variance_scaling', 'uniform', 'fan_in_uniform' or 'xavier_uniform' "
                         "for a scaled one.")
    return INITIALIZERS[name](scale)
