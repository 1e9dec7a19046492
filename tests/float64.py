"""Shared by the layer and model tests: float64 throughout, and float64 variables.

A test module that imports ``float64_only`` runs each of its tests with x64 enabled.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

RTOL = 1e-10
ATOL = 1e-12


@pytest.fixture(autouse=True)
def float64_only():
    with jax.enable_x64(True):
        yield


def abstract_init(module, x):
    """The variables' shapes and dtypes, traced without running (or compiling) the
    initializers; every test then draws its own float64 values with ``randomize``."""
    return jax.eval_shape(module.init, jax.random.key(0), x)


def randomize(variables, seed):
    """Replace every variable by fresh float64 values (kernels ~ N(0, 1/fan_in), biases
    ~ N(0, 0.25)), so the tests do not depend on the initializers and biases are nonzero."""
    rng = np.random.default_rng(seed)

    def draw(leaf):
        shape = leaf.shape
        if len(shape) == 2:
            return jnp.asarray(rng.normal(size=shape) / np.sqrt(shape[0]))
        return jnp.asarray(0.5 * rng.normal(size=shape))

    return jax.tree_util.tree_map(draw, variables)
