"""What a person reads of a run: the trainer's lines on stdout (a file, a notebook, a
terminal), main.py's log lines, and one line for a damaged checkpoint."""

import io
import logging
import pathlib
import re
import sys

import optax
import pytest
from flax import linen as nn

from bioflax import losses as losses_lib
from bioflax.experiment import input_pipeline as batches
from bioflax.trainer import Console, ModelCheckpoint, ReportProgress, Task, Trainer
from bioflax.trainer import metrics as trainer_metrics
from e2e import run_main

import numpy as np

ABSL_PREFIX = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ (\S+\.py):\d+\] ")


def linear_task():
    return Task(module=nn.Dense(1), loss=losses_lib.mean_squared_error,
                optimizer=optax.sgd(0.1), metrics=trainer_metrics.RegressionMetrics)


def linear_split(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (n, 3)).astype(np.float32)
    return batches.Split(x, x @ np.array([[1.0], [-2.0], [0.5]], np.float32))


def the(kind, trainer):
    return next(c for c in trainer.callbacks if isinstance(c, kind))


class Recorder:
    def __init__(self):
        self.scalars = []

    def write_scalars(self, step, scalars):
        self.scalars.append((step, dict(scalars)))

    def flush(self):
        pass


def test_epoch_lines_go_to_stdout_when_it_is_not_a_terminal(capsys):
    Trainer(max_epochs=2, log_every_steps=2).fit(linear_task(), linear_split(),
                                                 linear_split(n=32, seed=1), batch_size=16)
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert [line.split("  ")[0] for line in lines] == ["epoch 1/2", "epoch 2/2"]
    assert " val/loss " in lines[0] and "\r" not in out  # no bar
    assert err == ""


def test_a_long_epoch_prints_progress_lines_and_the_metric_writer_gets_the_rate(capsys):
    writer = Recorder()
    trainer = Trainer(max_epochs=2, log_every_steps=1, progress_bar=False, writer=writer)
    the(Console, trainer).every_secs = 0
    the(ReportProgress, trainer).every_secs = 0
    trainer.fit(linear_task(), linear_split(), batch_size=16)  # 4 steps per epoch
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("  ")[0] for line in lines] == [
        "step 1/8", "step 2/8", "step 3/8", "epoch 1/2",
        "step 5/8", "step 6/8", "step 7/8", "epoch 2/2"]
    assert all(re.fullmatch(r"step \d/8  \d+\.\d steps/s  \d+ s left", line)
               for line in lines if line.startswith("step"))
    rates = [s["steps_per_sec"] for _, s in writer.scalars if "steps_per_sec" in s]
    assert len(rates) >= 6 and all(rate > 0 for rate in rates)


def test_a_bar_and_the_lines_go_to_the_consoles_stream(capsys):
    stream = io.StringIO()
    trainer = Trainer(max_epochs=2, log_every_steps=2)
    trainer.callbacks = [Console(bar=True, stream=stream) if isinstance(c, Console) else c
                         for c in trainer.callbacks]
    trainer.fit(linear_task(), linear_split(), batch_size=16)
    written = stream.getvalue()
    assert "epoch 1/2  train/loss " in written and "epoch 2/2  train/loss " in written
    assert "step/s" in written  # tqdm's bar
    assert capsys.readouterr().out == ""


def test_each_damaged_checkpoint_is_one_warning_line(tmp_path, capfd, caplog, monkeypatch):
    directory = tmp_path / "checkpoints"

    def fit(epochs):  # many arrays: reading a damaged checkpoint leaves reads running
        task = Task(module=nn.Sequential([nn.Dense(4) for _ in range(8)] + [nn.Dense(1)]),
                    loss=losses_lib.mean_squared_error, optimizer=optax.adam(0.01),
                    metrics=trainer_metrics.RegressionMetrics)
        return Trainer(max_epochs=epochs, log_every_steps=4, progress_bar=False,
                       callbacks=[ModelCheckpoint(str(directory), every_n_steps=4,
                                                  max_to_keep=10)]).fit(
            task, linear_split(), batch_size=16, resume=True)

    fit(7)  # a checkpoint every epoch, steps 4 ... 28
    damaged = list(range(8, 29, 4))
    for step in damaged:
        for data_file in (directory / str(step)).rglob("d/*"):
            with open(data_file, "r+b") as f:
                f.truncate(10)
    # What pytest would turn into warnings is printed, as outside pytest.
    monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)
    capfd.readouterr()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert fit(8).first_step == 4
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == len(damaged), warnings
    for step, warning in zip(reversed(damaged), warnings):
        assert f"step {step} " in warning and f"{step}.unreadable" in warning, warning
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and "Event loop is closed" not in out + err, err[-3000:]


@pytest.mark.e2e
@pytest.mark.parametrize("options", [(), ("--log_format=absl", "--verbosity=1")])
def test_main_prints_epoch_lines_to_stdout_and_only_its_own_log_lines(tmp_path, options):
    result = run_main("configs/teacher.py", tmp_path, "--config.training.fast_dev_run=3",
                      "--config.training.epochs=2", "--config.plots=False", *options)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("epoch 1/1  train/loss "), result.stdout  # fast_dev_run
    log = result.stderr.splitlines()
    assert sum("Finished at step 3: test/loss " in line for line in log) == 1, log
    sources = {match.group(1) for match in map(ABSL_PREFIX.match, log) if match}
    if not options:
        assert not sources, log
        return
    # At verbosity 1 bioflax's DEBUG lines (the metric writer's scalars, the parameter
    # table) and no other library's INFO or DEBUG lines (JAX's compiler: hundreds).
    ours = {path.name for path in (pathlib.Path(__file__).resolve().parents[1]
                                   / "bioflax").rglob("*.py")}
    assert sources <= ours, sources - ours
    assert any("train/loss" in line for line in log if "console.py" in line), log
    assert len(log) < 200, log


def test_a_notebook_cell_shows_the_epoch_lines(tmp_path):
    """Run in a Jupyter kernel (nbclient), as a notebook user runs it."""
    import nbclient  # pylint: disable=import-outside-toplevel
    import nbformat  # pylint: disable=import-outside-toplevel
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(
        "import numpy as np, optax\n"
        "from flax import linen as nn\n"
        "import bioflax\n"
        "x = np.random.default_rng(0).normal(size=(256, 4)).astype(np.float32)\n"
        "y = (x.sum(axis=1) > 0).astype(np.int32)\n"
        "task = bioflax.Task(bioflax.convert(nn.Dense(2), 'fa'),\n"
        "                    bioflax.losses.softmax_cross_entropy, optax.sgd(0.1))\n"
        "trainer = bioflax.Trainer(max_epochs=2, log_every_steps=4)\n"
        "result = trainer.fit(task, (x, y), val=(x, y), batch_size=32)\n")]
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    shown = "".join(output.get("text", "") for output in notebook.cells[0].outputs
                    if output.get("name") == "stdout")
    lines = shown.splitlines()
    assert [line.split("  ")[0] for line in lines] == ["epoch 1/2", "epoch 2/2"], shown
    assert all(" val/accuracy " in line for line in lines), shown
