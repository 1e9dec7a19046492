"""End-to-end runs of main.py: training, event files, checkpoints, resume, many devices."""

import signal
import subprocess
import time

import numpy as np
import pytest

from bioflax.experiment.tensorboard_reader import read_scalars
from e2e import (checkpoint_steps, environment, flat_arrays, load_checkpoint, main_command,
                 run_main, REPO)

pytestmark = pytest.mark.e2e  # runs main.py or other processes: `pytest -m 'not e2e'` skips it

SHORT_MNIST = ("--config.training.epochs=1", "--config.training.limit_train_batches=300",
               "--config.training.checkpoint_every_steps=100",
               "--config.alignment.every_steps=50")


# kp (ReLU, weight decay on W and B) and dfa (tanh, output feedback) through main.py cover
# both activations and both kinds of feedback of configs/mnist_mlp.py; bp_mnist.py is
# kp_mnist.py with the rule bp and no weight decay, fa_mnist.py dfa_mnist.py with the rule
# fa, and test_trainer.py checks that the trainer trains every rule as a plain loop does
# (two more start-ups of main.py cost a minute of the suite).
@pytest.mark.parametrize("rule", ["kp", "dfa"])
def test_main_trains_each_rule_on_mnist(tmp_path, rule):
    result = run_main(f"configs/{rule}_mnist.py", tmp_path, *SHORT_MNIST)
    assert result.returncode == 0, result.stderr[-3000:]
    scalars = read_scalars(tmp_path)
    losses = [value for _, value in scalars["train/loss"]]
    assert [step for step, _ in scalars["train/loss"]] == [100, 200, 300]
    assert losses[-1] < 0.6 * losses[0]
    assert scalars["test/accuracy"][-1][1] > 0.85
    assert "val/accuracy" in scalars and "learning_rate" in scalars
    assert "alignment/grad_angle/layer_0" in scalars
    assert checkpoint_steps(tmp_path) == [100, 200, 300]


@pytest.mark.parametrize("config", ["configs/teacher.py", "configs/sinreg.py"])
def test_main_trains_regression_tasks(tmp_path, config):
    result = run_main(config, tmp_path, "--config.training.epochs=3")
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [value for _, value in read_scalars(tmp_path)["train/loss"]]
    assert losses[-1] < 0.5 * losses[0]
    assert checkpoint_steps(tmp_path)
    # The console holds the run's own lines: no TensorFlow start-up or TensorBoard notices.
    for notice in ("absl::InitializeLog", "oneDNN", "cpu_feature_guard", "directory_watcher"):
        assert notice not in result.stderr, result.stderr[-3000:]


KILL_RUN = ("--config.training.epochs=30", "--config.training.checkpoint_every_steps=500",
            "--config.training.keep_checkpoints=20")


def test_killed_run_resumes_to_the_parameters_of_an_uninterrupted_run(tmp_path):
    uninterrupted, interrupted = tmp_path / "uninterrupted", tmp_path / "interrupted"
    result = run_main("configs/teacher.py", uninterrupted, *KILL_RUN)
    assert result.returncode == 0, result.stderr[-3000:]
    final_step = checkpoint_steps(uninterrupted)[-1]

    process = subprocess.Popen(main_command("configs/teacher.py", interrupted, *KILL_RUN),
                               cwd=REPO, env=environment(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not [s for s in checkpoint_steps(interrupted) if s >= 1000]:
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    killed_at = checkpoint_steps(interrupted)[-1]
    assert killed_at < final_step

    result = run_main("configs/teacher.py", interrupted, *KILL_RUN)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Resuming from the checkpoint of step {killed_at}" in result.stderr
    expected = flat_arrays(load_checkpoint(uninterrupted, final_step)["params"])
    resumed = flat_arrays(load_checkpoint(interrupted, final_step)["params"])
    assert expected.keys() == resumed.keys()
    for name in expected:
        np.testing.assert_array_equal(resumed[name], expected[name], err_msg=name)


def test_one_and_eight_devices_give_the_same_loss_curve(tmp_path):
    overrides = ("--config.model.rule=kp", "--config.data.batch_size=64",
                 "--config.training.epochs=2", "--config.training.log_every_steps=20")
    curves = {}
    for devices in (1, 8):
        workdir = tmp_path / f"devices_{devices}"
        result = run_main("configs/teacher.py", workdir, *overrides, devices=devices)
        assert result.returncode == 0, result.stderr[-3000:]
        curves[devices] = read_scalars(workdir)["train/loss"]
    assert [s for s, _ in curves[1]] == [s for s, _ in curves[8]]
    assert len(curves[1]) >= 10
    np.testing.assert_allclose([v for _, v in curves[8]], [v for _, v in curves[1]],
                               rtol=1e-4)
