"""``train_and_evaluate(config, workdir)``: a config becomes data, model, optimizer, trainer."""

import contextlib
import datetime
import functools
import json
import logging
import os
import time
from typing import Any

import jax
import ml_collections
from absl import logging as absl_logging
from clu import metric_writers

from bioflax import alignment, distributed, losses, procedures
from bioflax import trainer as trainer_lib
from bioflax.experiment import datasets, models, optimizers, plots, validate
from bioflax.experiment import workdir as workdir_lib
from bioflax.experiment.input_pipeline import TFData
from bioflax.experiment.tensorboard_reader import read_scalars
from bioflax.trainer import metrics as metrics_lib
from bioflax.trainer.console import LoggingWriter
from bioflax.trainer import (Durations, InMemory, OptimizerFactory, Task, Trainer, make_mesh,
                             resolve_durations)

logger = logging.getLogger(__name__)


def build_model(config: ml_collections.ConfigDict, info: datasets.DatasetInfo, sample_input):
    """The config's model; an NNX one is built from ``config.seed`` for ``sample_input``."""
    return models.build(config.model, info.num_outputs, sample_input, config.seed)


def run_length(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The :class:`Trainer`'s run-length arguments for ``config`` (``fast_dev_run`` caps
    the steps in all and per epoch): given to the Trainer and to :func:`durations` alike."""
    training, fast_dev_run = config.training, config.training.fast_dev_run
    return {"max_epochs": training.epochs, "max_steps": fast_dev_run or None,
            "limit_train_batches": training.limit_train_batches or fast_dev_run or None}


def durations(config: ml_collections.ConfigDict, num_train_examples: int) -> Durations:
    """The run's length in steps, as the trainer will resolve it for this config."""
    return resolve_durations(num_train_examples, config.data.batch_size, **run_length(config))


def intervals(config: ml_collections.ConfigDict, durations_: Durations) -> dict[str, int]:
    """The config's log and alignment intervals in steps; a ``*_epochs`` field, when set,
    wins over its ``*_steps`` field, so intervals given in epochs follow the batch size and
    data size."""
    training = config.training
    return {
        "log": durations_.steps(training.log_every_steps, training.log_every_epochs),
        "alignment": durations_.steps(config.alignment.every_steps,
                                      config.alignment.every_epochs),
    }


def build_task(config: ml_collections.ConfigDict, info: datasets.DatasetInfo,
               alignment_every_steps: int, sample_input) -> Task:
    """The task of ``config``; ``sample_input`` (one example, batched) shapes an NNX
    model's DFA feedback (:func:`build_model`)."""
    module = build_model(config, info, sample_input)
    step_metrics = ([alignment.Alignment(alignment_every_steps)]
                    if config.alignment.enabled else [])
    return Task(
        module=module,
        loss=losses.loss_for(info.problem, config.model.loss),
        optimizer=OptimizerFactory(functools.partial(optimizers.build, config.optimizer)),
        metrics=metrics_lib.COLLECTIONS[info.problem],
        step_metrics=step_metrics,
        procedure=procedures.get_procedure(
            config.procedure.name, **config.procedure.get(config.procedure.name, {})))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains as ``config`` says, resuming from ``workdir/checkpoints``; returns metrics.

    The result holds ``history`` (one dict per epoch), ``test`` (final test metrics,
    ``test/loss`` ...) and ``state`` (the trained TrainState).
    """
    if config.training.multi_host or distributed.requested():
        distributed.initialize()
    validate.validate(config)
    one_run_per_workdir = (workdir_lib.exclusive(workdir) if jax.process_index() == 0
                           else contextlib.nullcontext())
    with one_run_per_workdir:
        info, splits = datasets.load(config.data, config.seed)
        return _train_and_evaluate(config, workdir, info, splits)


def write_result(workdir: str, test: dict[str, float], steps: int, first_step: int,
                 wall_time_s: float) -> str:
    """Writes ``workdir/result.json``, the mark of a finished run; returns its path.

    It holds the final test metrics, the steps trained, the wall time of the session that
    finished the run (``first_step`` > 0: it resumed there) and the devices it ran on. The
    file is written whole (a temporary file renamed), so it is never half there.
    """
    devices = jax.devices()
    result = {
        "test": {name: float(value) for name, value in test.items()},
        "steps": steps, "first_step": first_step, "wall_time_s": round(wall_time_s, 1),
        "device": devices[0].device_kind, "platform": devices[0].platform,
        "num_devices": len(devices), "num_processes": jax.process_count(),
        "jax_version": jax.__version__,
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    path = os.path.join(workdir, workdir_lib.RESULT_FILE)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    os.replace(path + ".tmp", path)
    return path


def _train_and_evaluate(config, workdir, info, splits):
    started = time.perf_counter()
    training = config.training
    fast_dev_run = training.fast_dev_run
    every = intervals(config, durations(config, len(splits["train"])))
    writer = _writer(workdir)
    writer.write_hparams(_flat_hparams(config))
    callbacks: list = [trainer_lib.LearningRateMonitor()]
    if training.early_stopping_patience or training.stopping_threshold is not None:
        callbacks.append(trainer_lib.EarlyStopping(
            training.early_stopping_monitor, mode=training.early_stopping_mode,
            patience=training.early_stopping_patience or None,
            stopping_threshold=training.stopping_threshold,
            smoothing=training.stopping_smoothing))
    if not fast_dev_run:
        epochs = training.checkpoint_every_epochs  # when set, wins over the steps
        callbacks.append(trainer_lib.ModelCheckpoint(
            os.path.join(workdir, workdir_lib.CHECKPOINTS_DIR),
            every_n_steps=None if epochs is not None else training.checkpoint_every_steps,
            every_n_epochs=epochs, max_to_keep=training.keep_checkpoints))
    trainer = Trainer(
        writer=writer, **run_length(config), log_every_steps=every["log"],
        callbacks=callbacks, seed=config.seed, limit_eval_batches=fast_dev_run or None,
        mesh=make_mesh(training.num_devices or None),
        num_seeds=training.num_seeds,
        compiler_options=config.compiler_options.to_dict())
    source = (InMemory if config.data.in_memory else TFData)(splits["train"])
    task = build_task(config, info, every["alignment"], source.sample_input())
    fit = trainer.fit(task, source, splits.get("validation"), batch_size=config.data.batch_size,
                      eval_batch_size=config.data.eval_batch_size, resume=True)
    test = trainer.evaluate(task, fit.state, splits["test"],
                            batch_size=config.data.eval_batch_size, prefix="test/")
    step = int(fit.state.step)
    writer.write_scalars(step, test)
    writer.flush()
    logger.info("Finished at step %d: %s. Every curve: tensorboard --logdir %s", step,
                "  ".join(f"{name} {value:.4g}" for name, value in test.items()
                          if not name.startswith("seed_")), workdir)
    if config.plots:
        _write_plots(workdir, writer, step, trainer, task, fit.state, info, splits["test"])
    if jax.process_index() == 0 and not fast_dev_run:
        write_result(workdir, test, step, fit.first_step, time.perf_counter() - started)
    return {"history": fit.history, "test": test, "state": fit.state}


def _writer(workdir: str):
    """TensorBoard event files in ``workdir`` (process 0); every scalar also in the log at
    ``--verbosity=1`` (bioflax's DEBUG lines)."""
    writers = []
    if jax.process_index() == 0:
        writers.append(metric_writers.SummaryWriter(workdir))
    if absl_logging.get_verbosity() >= 1:
        writers.append(LoggingWriter())
    return metric_writers.AsyncMultiWriter(writers)


def _write_plots(workdir, writer, step, trainer, task, state, info, test):
    """Alignment curves and test predictions, as PNG files in workdir/plots and in TensorBoard.

    Every process computes the predictions (one program over all devices); process 0 draws.
    """
    sample = test.head(1000)
    outputs = None
    if info.problem in plots.PREDICTION_PROBLEMS:
        outputs = trainer.predict(task, state, sample.inputs)
        if trainer.num_seeds > 1:
            outputs = outputs[0]  # the first seed's predictions
    if jax.process_index() > 0:
        return
    figures = plots.run_figures(read_scalars(workdir), info.problem, sample.inputs,
                                sample.targets, outputs)
    plots.save_figures(figures, os.path.join(workdir, workdir_lib.PLOTS_DIR), writer, step)
    writer.flush()


def _flat_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as flat ``section.field`` hyper-parameters (tuples as strings)."""
    flat = {}

    def visit(prefix, node):
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, (dict, ml_collections.ConfigDict)):
                visit(f"{name}.", value)
            else:
                flat[name] = value if isinstance(value, (int, float, str, bool)) else str(value)

    visit("", config)
    return flat
