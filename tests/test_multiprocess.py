"""Multi-process runs for real: 2 local processes x 2 CPU devices, joined by bioflax.launch,
against one process with 4 devices on the same global batch (the reference)."""

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from bioflax import distributed
from bioflax.experiment import launch
from bioflax.errors import DistributedError
from bioflax.experiment.tensorboard_reader import read_scalars
from e2e import (checkpoint_steps, environment, flat_arrays, load_checkpoint, main_command,
                 run_main, REPO)

pytestmark = pytest.mark.e2e  # runs main.py or other processes: `pytest -m 'not e2e'` skips it

TEACHER = "configs/teacher.py"
STEPS_PER_EPOCH = 16  # 1024 examples in global batches of 64
EPOCHS = 8
RUN = ("--config.model.rule=kp", "--config.data.train_size=1024", "--config.data.test_size=500",
       "--config.data.batch_size=64", "--config.data.eval_batch_size=500",
       "--config.training.log_every_steps=16", "--config.training.checkpoint_every_steps=16",
       "--config.training.keep_checkpoints=20", "--config.alignment.every_steps=16",
       "--config.optimizer.weight_decay=0.001", "--config.plots=False")
STOP_BOUND_S = 30  # a process killed: the launcher has stopped the others within this


def epochs(n: int) -> str:
    return f"--config.training.epochs={n}"


def launch_command(workdir, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "bioflax.launch", "--processes=2", "--devices-per-process=2",
            "--", *main_command(TEACHER, workdir, *RUN, *overrides)[1:]]


def run_two_processes(workdir, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(launch_command(workdir, *overrides), cwd=REPO, env=environment(),
                          capture_output=True, text=True, timeout=300)


def log(workdir, process: int) -> str:
    return (pathlib.Path(workdir) / "logs" / f"process_{process}.log").read_text()


def final_params(workdir) -> dict[str, np.ndarray]:
    return flat_arrays(load_checkpoint(workdir, EPOCHS * STEPS_PER_EPOCH)["params"])


def assert_same_run(workdir, reference, first_step: int = 0) -> None:
    """The loss curve after ``first_step`` and the final parameters (W and KP's B) of the
    reference run."""
    curve = read_scalars(workdir)["train/loss"]
    expected = [(s, v) for s, v in read_scalars(reference)["train/loss"] if s > first_step]
    assert [s for s, _ in curve] == [s for s, _ in expected]
    np.testing.assert_allclose([v for _, v in curve], [v for _, v in expected], rtol=1e-4)
    params, expected_params = final_params(workdir), final_params(reference)
    assert params.keys() == expected_params.keys()
    for name, value in expected_params.items():
        np.testing.assert_allclose(params[name], value, rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, 4 devices, uninterrupted: a checkpoint every epoch, all kept."""
    workdir = tmp_path_factory.mktemp("one_process")
    result = run_main(TEACHER, workdir, *RUN, epochs(EPOCHS), devices=4)
    assert result.returncode == 0, result.stderr[-3000:]
    assert checkpoint_steps(workdir) == [STEPS_PER_EPOCH * (e + 1) for e in range(EPOCHS)]
    return workdir


def test_in_memory_run_matches_one_process_and_checkpoints_move_between_them(tmp_path,
                                                                            reference):
    # 1 -> 2 processes: resume from the reference's checkpoint of epoch 3.
    shutil.copytree(reference / "checkpoints", tmp_path / "checkpoints")
    for step in checkpoint_steps(tmp_path)[3:]:
        shutil.rmtree(tmp_path / "checkpoints" / str(step))
    result = run_two_processes(tmp_path, epochs(6), "--config.plots=True")
    assert result.returncode == 0, result.stderr[-3000:]
    for process in (0, 1):
        assert "Resuming from the checkpoint of step 48" in log(tmp_path, process)
    # Checkpoints written once, each whole; the files of a run written by process 0 only.
    assert sorted(os.listdir(tmp_path / "checkpoints")) == sorted(
        str(STEPS_PER_EPOCH * e) for e in range(1, 7))
    events = [p.name for p in tmp_path.iterdir() if p.name.startswith("events.out")]
    process_0 = (tmp_path / ".lock").read_text().split()[1]  # "pid N on HOST"
    assert len(events) == 1 and f".{process_0}." in events[0], (events, process_0)
    assert sorted(os.listdir(tmp_path / "plots"))
    assert '"num_processes": 2' in (tmp_path / "result.json").read_text()

    # 2 -> 1 process: the multi-process checkpoint of epoch 6 resumes on one process.
    result = run_main(TEACHER, tmp_path, *RUN, epochs(EPOCHS), devices=4)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resuming from the checkpoint of step 96" in result.stderr
    assert_same_run(tmp_path, reference, first_step=48)


def process_ids(launcher: subprocess.Popen) -> dict[int, int]:
    """``{JAX_PROCESS_ID: pid}`` of the launcher's children."""
    children = pathlib.Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children")
    ids = {}
    for pid in children.read_text().split():
        environ = pathlib.Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        for entry in environ:
            if entry.startswith(f"{distributed.PROCESS_ID}=".encode()):
                ids[int(entry.split(b"=", 1)[1])] = int(pid)
    return ids


def test_tf_data_run_killed_on_one_process_stops_and_resumes_past_a_corrupt_checkpoint(
        tmp_path, reference):
    overrides = ("--config.data.in_memory=False", epochs(EPOCHS))
    launcher = subprocess.Popen(launch_command(tmp_path, *overrides), cwd=REPO,
                                env=environment(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not [s for s in checkpoint_steps(tmp_path) if s >= 64]:
        assert launcher.poll() is None, launcher.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    pids = process_ids(launcher)
    os.kill(pids[1], signal.SIGKILL)
    killed = time.monotonic()
    _, stderr = launcher.communicate(timeout=STOP_BOUND_S)
    assert time.monotonic() - killed < STOP_BOUND_S
    assert launcher.returncode != 0
    assert stderr.strip().splitlines()[-1].startswith(
        f"error: process 1 of 2 (pid {pids[1]}) was killed by SIGKILL, so the other "
        "processes were stopped."), stderr[-3000:]
    with pytest.raises(ProcessLookupError):
        os.kill(pids[0], 0)

    steps = checkpoint_steps(tmp_path)
    assert steps[-1] < EPOCHS * STEPS_PER_EPOCH
    newest, previous = steps[-1], steps[-2]
    for data_file in (tmp_path / "checkpoints" / str(newest)).rglob("d/*"):
        with open(data_file, "r+b") as f:
            f.truncate(10)
    result = run_two_processes(tmp_path, *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    for process in (0, 1):
        assert f"Resuming from the checkpoint of step {previous}" in log(tmp_path, process)
    assert f"step {newest}" in log(tmp_path, 0) and "unreadable" in log(tmp_path, 0)
    aside = [p for p in os.listdir(tmp_path / "checkpoints") if "unreadable" in p]
    assert aside == [f"{newest}.unreadable"]  # set aside once, by one process
    assert_same_run(tmp_path, reference)


# --- the environment and the launcher's input ------------------------------------------


@pytest.mark.parametrize("env, expected", [
    ({"JAX_NUM_PROCESSES": "2"}, "JAX_PROCESS_ID=None must be set to this process's id in 0..1"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, "JAX_PROCESS_ID='2' must be set"),
    ({"JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES='two' must be an integer"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"},
     "JAX_NUM_PROCESSES=2 is set but JAX_COORDINATOR_ADDRESS is not"),
])
def test_an_incomplete_environment_is_named_before_joining(monkeypatch, env, expected):
    for name in (distributed.COORDINATOR, distributed.NUM_PROCESSES, distributed.PROCESS_ID):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(DistributedError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        distributed.initialize()


@pytest.mark.skipif(any(name in os.environ for name in (
    "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "KUBERNETES_SERVICE_HOST", "TPU_WORKER_ID")),
    reason="JAX would detect this cluster and join it")
def test_multi_host_with_only_a_coordinator_address_says_what_is_missing():
    # The case: jax.distributed.initialize alone stops with a bare ValueError.
    env = {k: v for k, v in os.environ.items()
           if k not in (distributed.NUM_PROCESSES, distributed.PROCESS_ID)}
    env[distributed.COORDINATOR] = f"127.0.0.1:{launch.free_port()}"
    initialize_in_a_fresh_process(env, "Number of processes must be defined. Outside "
                                       "SLURM, .* set JAX_COORDINATOR_ADDRESS, "
                                       "JAX_NUM_PROCESSES and JAX_PROCESS_ID")


def test_a_coordinator_that_never_answers_is_named():
    env = {**os.environ, distributed.COORDINATOR: f"127.0.0.1:{launch.free_port()}",
           distributed.NUM_PROCESSES: "2", distributed.PROCESS_ID: "1"}
    initialize_in_a_fresh_process(env, "no coordinator answers at JAX_COORDINATOR_ADDR",
                                  connect_timeout_s=1)


def initialize_in_a_fresh_process(env, error: str, connect_timeout_s=None) -> None:
    """``distributed.initialize()`` under ``env`` raises a DistributedError matching
    ``error``; in a new process, as jax.distributed.initialize must come before any JAX
    computation, which earlier tests in this process have run."""
    code = "\n".join([
        "import pytest", "from bioflax import distributed",
        "from bioflax.errors import DistributedError",
        *([f"distributed.CONNECT_TIMEOUT_S = {connect_timeout_s}"] if connect_timeout_s else []),
        f"with pytest.raises(DistributedError, match={error!r}):",
        "    distributed.initialize()"])
    subprocess.run([sys.executable, "-c", code], check=True, env=env,
                   cwd=pathlib.Path(__file__).resolve().parents[1])


def test_each_process_gets_its_id_the_count_a_shared_port_and_its_devices():
    envs = [launch.process_environment(i, 2, 1234, 3, base={"XLA_FLAGS": "--xla_foo=1"})
            for i in range(2)]
    assert [e["JAX_PROCESS_ID"] for e in envs] == ["0", "1"]
    assert {e["JAX_NUM_PROCESSES"] for e in envs} == {"2"}
    assert {e["JAX_COORDINATOR_ADDRESS"] for e in envs} == {"127.0.0.1:1234"}
    assert envs[0]["XLA_FLAGS"] == "--xla_foo=1 --xla_force_host_platform_device_count=3"


@pytest.mark.parametrize("argv, expected", [
    (["--processes=2", "--"], "error: no command to run"),
    (["--processes=0", "--", "main.py", "--workdir=w"], "error: --processes=0 must be"),
    (["--processes=2", "--", "main.py", "--config=c"], "error: the command has no --workdir"),
])
def test_launcher_input_mistakes_are_one_error_line(capsys, argv, expected):
    assert launch.main(argv) == 2
    assert capsys.readouterr().err.strip().startswith(expected)


def test_importing_bioflax_starts_no_jax_backend():
    """jax.distributed.initialize must come before any backend use: importing may not."""
    code = ("import bioflax, bioflax.experiment.run, bioflax.converter, bioflax.zoo\n"
            "import jax._src.xla_bridge as xb\nassert not xb._backends, list(xb._backends)")
    subprocess.run([sys.executable, "-c", code], check=True,
                   cwd=pathlib.Path(__file__).resolve().parents[1])


def test_an_nnx_model_trains_on_two_processes_as_on_one(tmp_path):
    """An NNX model (``model.api='nnx'``, built from the config's seed in every process)
    trains on 2 processes × 2 devices exactly as on one process with 4 devices."""
    nnx_run = ("--config.model.api=nnx", epochs(2))
    one, two = tmp_path / "one", tmp_path / "two"
    result = run_main(TEACHER, one, *RUN, *nnx_run, devices=4)
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_two_processes(two, *nnx_run)
    assert result.returncode == 0, result.stderr[-3000:]
    curve, expected = read_scalars(two)["train/loss"], read_scalars(one)["train/loss"]
    assert [s for s, _ in curve] == [s for s, _ in expected]
    np.testing.assert_allclose([v for _, v in curve], [v for _, v in expected], rtol=1e-4)
    params = flat_arrays(load_checkpoint(two, 2 * STEPS_PER_EPOCH)["params"])
    expected_params = flat_arrays(load_checkpoint(one, 2 * STEPS_PER_EPOCH)["params"])
    assert params.keys() == expected_params.keys()
    for name, value in expected_params.items():
        np.testing.assert_allclose(params[name], value, rtol=1e-4, atol=1e-5, err_msg=name)
