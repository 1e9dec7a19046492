"""Helpers for the end-to-end tests: run main.py in a subprocess, read what it left."""

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

REPO = pathlib.Path(__file__).resolve().parents[1]


def main_command(config: str, workdir, *overrides: str) -> list[str]:
    return [sys.executable, str(REPO / "main.py"), f"--config={REPO / config}",
            f"--workdir={workdir}", *overrides]


def environment(devices: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_main(config: str, workdir, *overrides: str, devices: int = 1,
             timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(main_command(config, workdir, *overrides), cwd=REPO,
                          env=environment(devices), capture_output=True, text=True,
                          timeout=timeout)


def checkpoint_steps(workdir) -> list[int]:
    directory = pathlib.Path(workdir) / "checkpoints"
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def load_checkpoint(workdir, step: int) -> dict:
    """Checkpoint ``step`` of ``workdir`` on this process's first device, whatever devices
    and processes wrote it."""
    path = pathlib.Path(workdir) / "checkpoints" / str(step) / "state"
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return ocp.Checkpointer(ocp.StandardCheckpointHandler()).restore(
        path, args=ocp.args.StandardRestore(fallback_sharding=here))


def flat_arrays(tree) -> dict[str, np.ndarray]:
    from flax import traverse_util  # pylint: disable=import-outside-toplevel
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}
