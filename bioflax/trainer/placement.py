"""Where arrays live: a 1-D ``'data'`` device mesh, the batch sharded over it, the state
replicated (XLA inserts the gradient all-reduce and computes batch statistics such as
BatchNorm's over the global batch)."""

from typing import Optional

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec


def make_mesh(num_devices: Optional[int] = None) -> jax.sharding.Mesh:
    """A 1-D mesh named ``'data'`` over the first ``num_devices`` devices (default: all)."""
    devices = jax.devices()
    num_devices = num_devices or len(devices)
    if num_devices > len(devices):
        raise ValueError(f"num_devices={num_devices} but only {len(devices)} devices exist.")
    return jax.sharding.Mesh(np.asarray(devices[:num_devices]), ("data",))


class Placement:
    """The shardings of a mesh: ``replicated`` (state, outputs), ``inputs`` (an evaluation
    batch), ``batch`` (a training batch, after the seed axis when ``num_seeds > 1``) and
    ``chunk`` (a chunk of training batches, steps first)."""

    def __init__(self, mesh: jax.sharding.Mesh, num_seeds: int = 1):
        self.mesh = mesh
        self.num_seeds = num_seeds
        self.replicated = NamedSharding(mesh, PartitionSpec())
        self.inputs = NamedSharding(mesh, PartitionSpec("data"))
        self.batch = NamedSharding(
            mesh, PartitionSpec("data") if num_seeds == 1 else PartitionSpec(None, "data"))
        self.chunk = NamedSharding(mesh, PartitionSpec(None, "data"))

    @staticmethod
    def to_global(local, sharding: NamedSharding):
        """This process's part of a global array (a pytree of them)."""
        return jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local)
