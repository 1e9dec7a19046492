"""Every failure mode ends in one clear message and an intact workdir (real signals, files)."""

import os
import random
import re
import signal
import subprocess
import time

import numpy as np
import pytest

from bioflax.experiment import validate as config_validation
from bioflax.experiment.errors import ConfigError
from bioflax.experiment.tensorboard_reader import read_scalars
from bioflax.experiment.configs import default as default_config
from e2e import (checkpoint_steps, environment, flat_arrays, load_checkpoint, main_command,
                 run_main, REPO)

pytestmark = pytest.mark.e2e  # runs main.py or other processes: `pytest -m 'not e2e'` skips it

TEACHER = "configs/teacher.py"
QUIET = ("--config.plots=False",)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The single 'error:' line of a failed run, which must come without a traceback."""
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


def start_main(workdir, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(main_command(TEACHER, workdir, *QUIET, *overrides), cwd=REPO,
                            env=environment(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(process: subprocess.Popen, workdir, at_least: int = 1,
                        timeout: float = 300):
    deadline = time.monotonic() + timeout
    while not [s for s in checkpoint_steps(workdir) if s >= at_least]:
        assert process.poll() is None, "the run ended before the test could act"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)


# --- config mistakes ------------------------------------------------------------------


@pytest.mark.parametrize("field, value, expected", [
    ("model.rule", "fb", "choose one of ['bp', 'fa', 'kp', 'interpolate_fa_bp', 'usf', 'frsf', 'brsf', 'dfa', "
                         "'drtp']"),
    ("model.activations", ("swish2",), "model.activations[0] = 'swish2'"),
    ("optimizer.name", "adagrad", "choose one of ['sgd', 'rmsprop', 'adam', 'adamw']"),
    ("optimizer.rmsprop_decay", 1.0, "optimizer.rmsprop_decay = 1.0 is invalid"),
    ("model.loss", "hinge", "choose one of ['softmax_cross_entropy', 'sigmoid_cross_entropy', "
                            "'sigmoid_mean_cross_entropy', 'sigmoid_squared_error']"),
    ("model.input_layer_kernel_init", "ones", "choose one of ['lecun_normal',"),
    ("training.early_stopping_mode", "up", "choose one of ['min', 'max']"),
    ("data.dataset", "imagenet2012", "choose one of ['mnist', 'fashion_mnist', 'cifar10', "
                                     "'cifar100', 'svhn_cropped', 'teacher', 'sinreg', 'text']"),
    ("data.random_flip", True, "augmentation runs in the tf.data pipeline: set "
                               "data.in_memory = False"),
    ("data.random_crop_padding", -1, "data.random_crop_padding = -1 is invalid"),
    ("model.activations", ("relu", "relu"), "needs one activation per hidden layer"),
    ("model.hidden_layers", (0,), "model.hidden_layers[0] = 0 is invalid: must be an integer > 0"),
    ("data.batch_size", -8, "data.batch_size = -8 is invalid: must be an integer > 0"),
    ("optimizer.learning_rate", 0.0, "optimizer.learning_rate = 0.0 is invalid"),
    ("data.val_split", 1.0, "must lie in [0, 1)"),
    ("training.stopping_smoothing", 1.0, "training.stopping_smoothing = 1.0 is invalid"),
    ("data.val_split", -0.1, "must lie in [0, 1)"),
    ("model.interpolation_factor", 1.5, "must lie in [0, 1]"),
    ("model.pooling", "mean", "model.name = 'mlp' does not read it (the models that do: "
                              "['vit_mnist']); leave it at 'cls'"),
    ("model.dfa_signal", "sign", "model.rule = 'bp' on model.name = 'mlp' (api 'linen') does "
                                 "not read it"),
])
def test_config_mistakes_name_field_value_and_allowed_values(field, value, expected):
    config = default_config.get_config()
    section, name = field.split(".")
    config[section][name] = value
    with pytest.raises(ConfigError, match=re.escape(expected)):
        config_validation.validate(config)


def test_compiler_options_that_xla_rejects_are_refused_before_training():
    config = default_config.get_config()
    config.compiler_options = {"xla_no_such_option": True}
    with pytest.raises(ConfigError, match=r"compiler_options = .*XLA rejected them .*"
                                          r"No such compile option: 'xla_no_such_option'"):
        config_validation.validate(config)


def test_dfa_hidden_layers_narrower_than_the_output_are_accepted():
    # DFA projects the error to each layer directly (tests/test_models.py checks the
    # updates of a narrow one against NumPy), so no width is refused any more.
    config = default_config.get_config()
    config.model.rule, config.model.hidden_layers, config.model.activations = (
        "dfa", (64, 8), ("tanh", "tanh"))
    config_validation.validate(config)


def test_batch_size_must_divide_over_the_devices():
    config = default_config.get_config()
    config.data.batch_size = 100
    with pytest.raises(ConfigError, match="data.batch_size = 100.*multiple of 8"):
        config_validation.validate(config, num_devices=8)


def test_main_reports_config_mistakes_before_loading_data(tmp_path):
    # The data dir does not exist: had data been loaded first, that error would show.
    result = run_main("configs/kp_mnist.py", tmp_path / "run", "--config.model.rule=fb",
                      f"--config.data.data_dir={tmp_path / 'nowhere'}")
    assert result.returncode == 2
    assert "model.rule = 'fb'" in one_error_line(result)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_main_reports_an_override_of_a_missing_field(tmp_path):
    result = run_main(TEACHER, tmp_path, "--config.optimizer.learning_rat=0.1")
    assert result.returncode == 2
    line = one_error_line(result)
    assert "--config.optimizer.learning_rat" in line and "no such field" in line


def test_a_mistyped_config_setting_is_one_line_naming_the_settings(tmp_path):
    result = run_main("configs/paper/akrout2019.py:kpp", tmp_path / "run")
    assert result.returncode == 2
    assert re.fullmatch(r"error: --config=\S*configs/paper/akrout2019\.py:kpp: akrout2019 has "
                        r"no 'kpp' setting; choose one of \['bp', 'fa', 'kp', 'wm'\]",
                        one_error_line(result))
    result = run_main("configs/kp_mnist.py:fa", tmp_path / "run")
    assert result.returncode == 2
    assert re.fullmatch(r"error: --config=\S*configs/kp_mnist\.py:fa: \S*configs/kp_mnist\.py "
                        r"takes no setting; drop ':fa'\.", one_error_line(result))


def test_a_missing_config_file_is_named(tmp_path):
    missing = tmp_path / "nope.py"
    for overrides in ((), ("--config.seed=1",)):  # overrides make the flag parser load it
        result = run_main(str(missing), tmp_path / "run", *overrides)
        assert result.returncode == 2
        line = one_error_line(result)
        assert f"the config file {missing} cannot be loaded: there is no such file" in line
        assert "--config=" in line
    assert not (tmp_path / "run").exists()


def test_a_workdir_that_cannot_be_created_is_named(tmp_path):
    result = run_main(TEACHER, "/proc/bioflax_workdir", *QUIET)
    assert result.returncode == 2
    line = one_error_line(result)
    assert "the workdir /proc/bioflax_workdir cannot be created" in line
    assert "Choose a directory that you can write to" in line


def test_a_workdir_that_is_a_file_is_refused_and_the_file_kept(tmp_path):
    path = tmp_path / "results.txt"
    path.write_text("keep me")
    result = run_main(TEACHER, path, *QUIET)
    assert result.returncode == 2
    assert (f"the workdir {path} is an existing file, not a directory"
            in one_error_line(result))
    assert path.read_text() == "keep me"


# --- data -----------------------------------------------------------------------------


def test_missing_mnist_says_where_tfds_looked_and_how_to_fix_it(tmp_path):
    empty = tmp_path / "empty_tfds"
    empty.mkdir()
    result = run_main("configs/bp_mnist.py", tmp_path / "run", f"--config.data.data_dir={empty}",
                      "--config.data.download=False")
    assert result.returncode == 1
    line = one_error_line(result)
    assert str(empty) in line and "TFDS_DATA_DIR" in line and "--config.data.data_dir" in line


# --- divergence -----------------------------------------------------------------------


def test_a_nan_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(tmp_path):
    # The learning rate warms up to a value that diverges, after some checkpoints.
    result = run_main(TEACHER, tmp_path, *QUIET, "--config.optimizer.learning_rate=1e4",
                      "--config.optimizer.warmup_steps=2000000", "--config.training.epochs=20",
                      "--config.training.log_every_steps=10",
                      "--config.training.checkpoint_every_steps=50")
    assert result.returncode == 1
    line = one_error_line(result)
    step = int(line.split("diverged at step ")[1].split(":")[0])
    assert "learning_rate" in line
    saved = checkpoint_steps(tmp_path)
    assert saved and max(saved) < step
    for name, value in flat_arrays(load_checkpoint(tmp_path, max(saved))["params"]).items():
        assert np.isfinite(value).all(), name


# --- signals and kills ----------------------------------------------------------------


@pytest.mark.parametrize("signum, exit_code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_sigint_checkpoint_and_the_run_resumes(tmp_path, signum, exit_code):
    # Far more epochs than the signal can wait for and no periodic checkpoint: the only
    # checkpoint is the one the signal writes, however fast or slow this machine trains.
    process = start_main(tmp_path, "--config.training.epochs=100000",
                         "--config.training.checkpoint_every_steps=1000000000",
                         "--config.training.log_every_steps=100")
    # Wait until training is under way (the first logged training loss), so the signal
    # meets the trainer's handler.
    deadline = time.monotonic() + 300
    while "train/loss" not in read_scalars(tmp_path):
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.2)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == exit_code, stderr[-3000:]
    stopped_at = int(stderr.split("stopped training at step ")[1].split(";")[0])
    assert checkpoint_steps(tmp_path) == [stopped_at]
    load_checkpoint(tmp_path, stopped_at)

    epochs = stopped_at // 200 + 2  # the teacher task has 200 steps per epoch
    result = run_main(TEACHER, tmp_path, *QUIET, f"--config.training.epochs={epochs}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Resuming from the checkpoint of step {stopped_at}" in result.stderr
    assert checkpoint_steps(tmp_path)[-1] == epochs * 200


def test_kill_9_at_random_moments_never_leaves_an_unloadable_latest_checkpoint(tmp_path):
    # A checkpoint every 10 steps: a kill at a random moment often lands inside a write.
    overrides = ("--config.training.epochs=100", "--config.training.log_every_steps=10",
                 "--config.training.checkpoint_every_steps=10",
                 "--config.training.keep_checkpoints=2")
    rng = random.Random(0)
    for _ in range(4):
        process = start_main(tmp_path, *overrides)
        wait_for_checkpoint(process, tmp_path, at_least=(checkpoint_steps(tmp_path) or [0])[-1]
                            + 1)
        time.sleep(rng.uniform(0.0, 0.5))
        process.kill()
        process.wait()
        latest = checkpoint_steps(tmp_path)[-1]
        load_checkpoint(tmp_path, latest)
    result = run_main(TEACHER, tmp_path, *QUIET, "--config.training.epochs=1",
                      "--config.training.checkpoint_every_steps=10")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resuming from the checkpoint of step" in result.stderr


# --- damaged checkpoints and foreign workdirs ----------------------------------------


def short_run(workdir, *overrides):
    return run_main(TEACHER, workdir, *QUIET, "--config.training.epochs=2",
                    "--config.training.checkpoint_every_steps=100",
                    "--config.training.keep_checkpoints=10", *overrides)


def test_a_truncated_or_partial_checkpoint_is_set_aside_for_the_newest_intact_one(tmp_path):
    assert short_run(tmp_path).returncode == 0
    assert checkpoint_steps(tmp_path) == [100, 200, 300, 400]
    for data_file in (tmp_path / "checkpoints" / "400").rglob("d/*"):
        with open(data_file, "r+b") as f:
            f.truncate(10)
    (tmp_path / "checkpoints" / "300" / "state" / "_METADATA").unlink()

    result = short_run(tmp_path, "--config.training.epochs=3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 400" in result.stderr and "unreadable" in result.stderr
    assert "Resuming from the checkpoint of step 200" in result.stderr
    assert (tmp_path / "checkpoints" / "400.unreadable").is_dir()  # kept, not deleted
    assert (tmp_path / "checkpoints" / "300.unreadable").is_dir()
    assert checkpoint_steps(tmp_path)[-1] == 600


def test_no_readable_checkpoint_is_said_clearly(tmp_path):
    assert short_run(tmp_path).returncode == 0
    for step in checkpoint_steps(tmp_path):
        (tmp_path / "checkpoints" / str(step) / "state" / "_METADATA").unlink()
    result = short_run(tmp_path)
    assert result.returncode == 1
    assert "None of the checkpoints" in one_error_line(result)


def test_a_workdir_of_another_model_shape_is_refused_with_the_parameter_named(tmp_path):
    assert short_run(tmp_path).returncode == 0
    before = sorted(os.listdir(tmp_path / "checkpoints"))
    result = short_run(tmp_path, "--config.model.hidden_layers=(25,)")
    assert result.returncode == 1
    line = one_error_line(result)
    assert "params/layer_0/bias is (20,) there and (25,) in this model" in line
    assert line.endswith("(--workdir)")
    assert sorted(os.listdir(tmp_path / "checkpoints")) == before


def test_a_second_run_on_a_busy_workdir_refuses_and_a_killed_runs_lock_does_not_block(
        tmp_path):
    # the first run is killed below; it must not finish first (with a warm compilation
    # cache 200 epochs took less than the second run's start-up)
    first = start_main(tmp_path, "--config.training.epochs=100000")
    wait_for_checkpoint(first, tmp_path)
    second = run_main(TEACHER, tmp_path, *QUIET, "--config.training.epochs=200")
    assert second.returncode == 1
    assert f"pid {first.pid}" in one_error_line(second)
    assert checkpoint_steps(tmp_path)  # the first run's checkpoints are untouched
    first.kill()
    first.wait()
    third = short_run(tmp_path)  # fewer epochs than already trained: resumes, evaluates
    assert third.returncode == 0, third.stderr[-3000:]
    assert "Resuming from the checkpoint" in third.stderr
