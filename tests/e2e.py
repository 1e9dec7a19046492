"""Helpers for the end-to-end tests: run main.py in a subprocess, read what it left."""

import json
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


def curves_on_devices(test_module: str, devices=(1, 8)) -> dict[int, list[float]]:
    """``test_module.cnn_curve()`` run in a subprocess with each number of CPU devices."""
    code = (f"import json, sys; sys.path.insert(0, 'tests'); import jax, {test_module} as t; "
            "print(json.dumps([jax.device_count(), t.cnn_curve()]))")
    curves = {}
    for count in devices:
        result = subprocess.run([sys.executable, "-c", code], cwd=REPO,
                                env=environment(count), capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        seen, curves[count] = json.loads(result.stdout.strip().splitlines()[-1])
        assert seen == count
    return curves


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
