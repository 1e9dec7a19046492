"""The training loop: :class:`Trainer` runs a :class:`Task`'s compiled chunks over a
:class:`DataSource`, evaluates each epoch, calls the callbacks and resumes from a
checkpoint callback."""

import collections
import contextlib
import dataclasses
import logging
import numbers
import re
import signal
import threading
from typing import Any, Optional, Sequence, Union

import jax
import numpy as np
from clu import parameter_overview

from bioflax.errors import TrainingDivergedError, TrainingInterrupted
from bioflax.trainer import durations as durations_lib
from bioflax.trainer import metrics as metrics_lib
from bioflax.trainer.arrays import ArrayData, as_data, check_batch_size, no_float64
from bioflax.trainer.callback import Callback, CheckpointCallback
from bioflax.trainer.console import Console, LoggingWriter, ReportProgress
from bioflax.trainer.data_sources import DataSource, InMemory
from bioflax.trainer.placement import Placement, make_mesh
from bioflax.trainer.programs import Programs, plan, scalars
from bioflax.trainer.task import Task, TrainState

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class FitResult:
    """What ``fit`` trained: the final ``state``, one dict of metrics per epoch finished in
    this session (``history``) and the step it started from (> 0 when it resumed)."""

    state: TrainState
    history: list[dict[str, float]]
    first_step: int


@dataclasses.dataclass(frozen=True)
class LogNames:
    """The names of the metrics in a ``fit``'s epoch logs, known before it trains:
    ``'epoch'``, ``'train/NAME'`` for each of the task's ``metric_names`` (None: not known,
    then any such name may come), ``'val/NAME'`` too when ``fit`` has validation data
    (``has_val``), each but ``'epoch'`` under ``'seed_i/'`` too with ``num_seeds > 1``; and,
    when the task has step metrics (``step_metrics``), their names, known only when they run
    (any name outside ``train/`` and ``val/``)."""

    metric_names: Optional[tuple[str, ...]]
    has_val: bool
    step_metrics: bool = False
    num_seeds: int = 1

    @property
    def known(self) -> list[str]:
        """The names every epoch's logs hold (the per-seed ones left out)."""
        names = ["epoch", *(f"train/{n}" for n in self.metric_names or ())]
        return names + [f"val/{n}" for n in self.metric_names or () if self.has_val]

    def missing(self, name: str) -> Optional[str]:
        """None when the epoch logs may hold ``name``; else why they will not, and the fix."""
        match = re.fullmatch(r"seed_(\d+)/(.+)", name)
        base = name
        if match and self.num_seeds > 1 and int(match.group(1)) < self.num_seeds:
            base = match.group(2)
            if base == "epoch":  # logged once, not per seed
                base = name
        if base in self.known:
            return None
        held = f"they hold {self.known}" + (
            f" (each but 'epoch' also as seed_0/... to seed_{self.num_seeds - 1}/...)"
            if self.num_seeds > 1 else "") + (
            " and the step metrics' names" if self.step_metrics else "")
        if base.startswith("val/") and not self.has_val:
            return (f"but fit got no validation data, so the epoch logs hold no val/ metrics "
                    f"({held}): pass val= data to fit, or monitor a name they hold.")
        if base.startswith(("train/", "val/")) and self.metric_names is None:
            return None
        if not base.startswith(("train/", "val/")) and base != "epoch" and self.step_metrics:
            return None
        return f"which the epoch logs will not hold; {held}: monitor one of them."


class Trainer:
    """Trains a :class:`Task` data-parallel over a device mesh.

    Args:
      workdir: where TensorBoard event files go when no ``writer`` is given (this needs
        TensorFlow, the ``[experiment]`` extra; none: scalars logged at DEBUG).
      max_epochs: epochs to train.
      max_steps: steps to train in all, over as many epochs as they take. With both, the
        run ends at whichever comes first; with neither, after one epoch. A run that ends
        inside an epoch still validates and logs that partial epoch.
      log_every_steps: steps per compiled program and per logged training average.
      callbacks: :class:`Callback` objects, run in order (checkpoint callbacks last).
      seed: initialises the model state and orders the training data.
      limit_train_batches: at most this many steps per epoch (a smoke-run knob).
      limit_eval_batches: at most this many batches per evaluation.
      mesh: the device mesh (default: all devices on a ``'data'`` axis).
      progress_bar: a live tqdm bar (default: when stdout is a terminal).
      console: print to stdout one line per epoch and, without a bar, a progress line
        inside long epochs (:class:`~bioflax.trainer.console.Console`); False: nothing.
      report_progress: write steps/s to the writer.
      num_seeds: train the seeds ``seed, seed+1, ...`` at once, vmapped in one program:
        each has its own initialisation, data order and random streams, as separate runs
        would; metrics are logged per seed (``seed_i/...``) and averaged.
      writer: a clu ``MetricWriter`` (default: TensorBoard files in ``workdir`` and logs).
      compiler_options: XLA options for every compiled program, as ``jax.jit`` takes them
        (e.g. ``bioflax.conv.CPU_COMPILER_OPTIONS``; None: XLA's defaults).

    ``fit`` sets, before any callback's ``on_fit_start``: ``durations`` (the run's
    :class:`~bioflax.trainer.durations.Durations`) and ``log_names`` (the
    :class:`LogNames` its epoch logs will hold).
    """

    def __init__(self, *, workdir: Optional[str] = None, max_epochs: Optional[int] = None,
                 max_steps: Optional[int] = None, log_every_steps: int = 100,
                 callbacks: Sequence[Callback] = (), seed: int = 0,
                 limit_train_batches: Optional[int] = None,
                 limit_eval_batches: Optional[int] = None,
                 mesh: Optional[jax.sharding.Mesh] = None,
                 progress_bar: Optional[bool] = None, console: bool = True,
                 report_progress: bool = True, num_seeds: int = 1, writer=None,
                 compiler_options: Optional[dict] = None):
        if log_every_steps <= 0:
            raise ValueError(f"log_every_steps must be positive, got {log_every_steps}.")
        if num_seeds < 1:
            raise ValueError(f"num_seeds must be >= 1, got {num_seeds}.")
        for name, value in (("max_epochs", max_epochs), ("max_steps", max_steps)):
            if value is not None and (isinstance(value, bool)
                                      or not isinstance(value, numbers.Integral) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}.")
        self.max_epochs = max_epochs
        self.max_steps = max_steps
        self.log_every_steps = log_every_steps
        self.seed = seed
        self.limit_train_batches = limit_train_batches
        self.limit_eval_batches = limit_eval_batches
        self.placement = Placement(mesh or make_mesh(), num_seeds)
        self.num_seeds = num_seeds
        self.compiler_options = compiler_options
        self.writer = writer if writer is not None else _default_writer(workdir)
        shown = ([Console(progress_bar)] if console else []) + (
            [ReportProgress()] if report_progress else [])
        user = list(callbacks)
        self.callbacks = ([c for c in user if not isinstance(c, CheckpointCallback)] + shown
                          + [c for c in user if isinstance(c, CheckpointCallback)])
        self.durations: Optional[durations_lib.Durations] = None
        self.log_names: Optional[LogNames] = None
        self.should_stop = False
        self._programs: dict = {}

    @property
    def mesh(self) -> jax.sharding.Mesh:
        return self.placement.mesh

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.num_seeds)]

    def programs(self, task: Task) -> Programs:
        """The compiled programs of ``task`` (kept with it, so its id is not reused)."""
        if id(task) not in self._programs:
            self._programs[id(task)] = (task, Programs(task, self.placement,
                                                            self.compiler_options))
        return self._programs[id(task)][1]

    def init_state(self, task: Task, sample_input: np.ndarray,
                   total_steps: Optional[int] = None) -> TrainState:
        """A fresh state for :attr:`seeds` (stacked when several), replicated."""
        return self.programs(task).init_state(self.seeds, sample_input, total_steps)

    # --- callback state ------------------------------------------------------------------

    def _callback_names(self) -> list[str]:
        seen: collections.Counter = collections.Counter()
        names = []
        for callback in self.callbacks:
            name = type(callback).__name__
            names.append(name if not seen[name] else f"{name}_{seen[name]}")
            seen[name] += 1
        return names

    def callback_states(self) -> dict[str, Any]:
        """Every callback's ``state_dict()``, by class name (``_1``... for repeats)."""
        return {name: callback.state_dict()
                for name, callback in zip(self._callback_names(), self.callbacks)}

    def _load_callback_states(self, states: dict[str, Any]) -> None:
        for name, callback in zip(self._callback_names(), self.callbacks):
            if name in states:
                callback.load_state_dict(states[name])

    # --- fit -----------------------------------------------------------------------------

    def fit(self, task: Task, train: Union[DataSource, ArrayData, tuple],
            val: Union[ArrayData, tuple, None] = None, *, batch_size: int,
            eval_batch_size: int = 1000, state: Optional[TrainState] = None,
            resume: bool = False) -> FitResult:
        """Trains ``task`` on ``train`` (a :class:`DataSource`; an :class:`ArrayData` or an
        ``(inputs, targets)`` tuple of arrays is held in memory), evaluating on ``val``
        (anything :meth:`evaluate` takes) after each epoch and at the end of the run.

        Starts from ``state`` when given, else from a fresh state, or, with ``resume=True``
        (opt-in, as Lightning's ``ckpt_path``), from the newest checkpoint of a
        :class:`CheckpointCallback` (its callbacks' states too).
        """
        source = train if isinstance(train, DataSource) else InMemory(as_data(
            train, name="train", accepted="a DataSource (InMemory, TFData), an ArrayData or "
            "an (inputs, targets) tuple of arrays"))
        val = None if val is None else _eval_data(val, "val")
        if self.num_seeds > 1 and not source.supports_seeds:
            raise ValueError(f"num_seeds={self.num_seeds}: training several seeds at once "
                             f"needs a data source that supports it (InMemory), not "
                             f"{type(source).__name__}.")
        check_batch_size(batch_size, self.mesh.size)
        self.durations = durations_lib.resolve(
            len(source), batch_size, max_epochs=self.max_epochs, max_steps=self.max_steps,
            limit_train_batches=self.limit_train_batches)
        if state is None:
            state = self.init_state(task, source.sample_input(), self.durations.total_steps)
            if resume:
                state = self._restore(state)
        first_step = int(state.step)
        logger.debug("%s", parameter_overview.get_parameter_overview(state.params))
        self.should_stop = False
        self.log_names = LogNames(_metric_names(task, source),
                                  has_val=val is not None and len(val) > 0,
                                  step_metrics=bool(task.step_metrics),
                                  num_seeds=self.num_seeds)
        try:
            for callback in self.callbacks:
                callback.on_fit_start(self, state)
            with self._stop_on_signals() as received:
                state, history = self._loop(task, state, source, val, batch_size,
                                            eval_batch_size, received)
            for callback in self.callbacks:
                callback.on_fit_end(self, state)
            self.writer.flush()
            if received:
                raise TrainingInterrupted(received[0], int(state.step))
        except BaseException as error:
            for callback in self.callbacks:
                callback.on_exception(self, error)
            raise
        return FitResult(state=state, history=history, first_step=first_step)

    def _restore(self, state: TrainState) -> TrainState:
        for callback in self.callbacks:
            if isinstance(callback, CheckpointCallback):
                restored = callback.restore_latest(state)
                if restored is not None:
                    state, callback_states = restored
                    self._load_callback_states(callback_states)
                    return state
        return state

    @contextlib.contextmanager
    def _stop_on_signals(self):
        """SIGINT/SIGTERM end the loop after the current chunk; a second one acts at once."""
        received: list[str] = []
        if threading.current_thread() is not threading.main_thread():
            yield received
            return

        def handle(signum, frame):
            del frame
            received.append(signal.Signals(signum).name)
            self.should_stop = True
            for number, handler in previous.items():
                signal.signal(number, handler)

        previous = {number: signal.signal(number, handle)
                    for number in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield received
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)

    def _loop(self, task, state, source, val, batch_size, eval_batch_size, received):
        program = self.programs(task).train_chunk(type(source))
        steps_per_epoch, total_steps = self.durations.steps_per_epoch, self.durations.total_steps
        history, step = [], int(state.step)
        while step < total_steps and not self.should_stop:
            epoch, in_epoch = divmod(step, steps_per_epoch)
            stop = min(steps_per_epoch, in_epoch + total_steps - step)
            for data, xs, n in source.chunks(self.placement, batch_size, self.seeds, epoch,
                                             in_epoch, stop, self.log_every_steps):
                state, *results = program(plan(task, step - epoch * steps_per_epoch, n),
                                          state, data, xs)
                # One transfer for everything the host reads of this chunk.
                (metrics, step_metrics), losses, params_finite = jax.device_get(results)
                _check_finite(losses, bool(params_finite), step)
                step += n
                logs = scalars({**{f"train/{k}": v for k, v in
                                   metrics_lib.compute_collection(metrics).items()},
                                **metrics_lib.compute_averages(step_metrics)}, self.num_seeds)
                self.writer.write_scalars(step, logs)
                for callback in self.callbacks:
                    callback.on_train_chunk_end(self, state, step, logs)
                if received:
                    break
            # A whole epoch, even if a signal came, or the run's last steps.
            if self.durations.ends_epoch(step):
                logs = {"epoch": epoch + 1, **logs}
                if self.log_names.has_val:
                    val_logs = self.evaluate(task, state, val, batch_size=eval_batch_size,
                                             prefix="val/")
                    logs.update(val_logs)
                    self.writer.write_scalars(step, val_logs)
                history.append(logs)
                for callback in self.callbacks:
                    callback.on_train_epoch_end(self, state, epoch, logs)
        return state, history

    # --- evaluation and prediction -------------------------------------------------------

    def evaluate(self, task: Task, state: TrainState, data, *,
                 batch_size: int = 1000, prefix: str = "") -> dict[str, float]:
        """Metrics of ``state`` over every example of ``data`` (an :class:`ArrayData`, an
        ``(inputs, targets)`` tuple of arrays, or anything with ArrayData's
        ``eval_batches``), named ``prefix + name`` (and ``seed_i/`` + that with several
        seeds)."""
        check_batch_size(batch_size, self.mesh.size, name="eval_batch_size")
        data = _eval_data(data, "data")
        evaluate = self.programs(task).evaluate()
        total = None
        batches = data.eval_batches(batch_size, process_index=jax.process_index(),
                                    process_count=jax.process_count())
        for index, batch in enumerate(batches):
            if self.limit_eval_batches and index >= self.limit_eval_batches:
                break
            metrics = evaluate(state, self.placement.to_global(batch, self.placement.inputs))
            total = metrics if total is None else total.merge(metrics)
        if total is None:
            raise ValueError("evaluate got no examples: pass data with at least one.")
        values = metrics_lib.compute_collection(jax.device_get(total))
        return scalars({prefix + name: value for name, value in values.items()},
                       self.num_seeds)

    def predict(self, task: Task, state: TrainState, inputs: np.ndarray, *,
                batch_size: int = 1000) -> np.ndarray:
        """The module's outputs for ``inputs`` ``(batch, ...)``, in evaluation mode, in
        padded, sharded batches: ``(batch, ...)``, or ``(seeds, batch, ...)`` with several
        seeds. The inputs keep their dtype (integer tokens stay integers), but float64
        becomes float32 unless JAX runs in 64 bits."""
        check_batch_size(batch_size, self.mesh.size)
        if not len(inputs):
            raise ValueError("predict got no inputs: pass an array of shape (batch, ...) "
                             "with batch >= 1.")
        inputs = no_float64(np.asarray(inputs))
        data = ArrayData(inputs=inputs, targets=np.zeros(len(inputs), np.int32))
        apply = self.programs(task).predict()
        outputs = []
        for batch in data.eval_batches(batch_size, process_index=jax.process_index(),
                                       process_count=jax.process_count()):
            out = apply(state, self.placement.to_global(batch["input"], self.placement.inputs))
            outputs.append(np.asarray(out))
        # Whole global batches in order, padded at the end: the first len(inputs) rows are real
        # (the mask of a batch holds only this process's rows).
        batch_axis = 0 if self.num_seeds == 1 else 1  # outputs of any rank: (…, T, vocab)
        real = (slice(None),) * batch_axis + (slice(len(inputs)),)
        return np.concatenate(outputs, axis=batch_axis)[real]


def _eval_data(data, name: str):
    """``data`` for :meth:`Trainer.evaluate`: as is when it has ``eval_batches``, else
    :func:`~bioflax.trainer.arrays.as_data`'s."""
    if hasattr(data, "eval_batches"):
        return data
    return as_data(data, name=name, accepted="an ArrayData, an (inputs, targets) tuple of "
                   "arrays, or a split with ArrayData's eval_batches")


def _metric_names(task: Task, source: DataSource) -> Optional[tuple[str, ...]]:
    """The names of ``task``'s metrics on ``source``'s targets (:meth:`Task.metrics_for`);
    None when they cannot be told."""
    target = source.sample_target()
    if target is None:
        return None
    collection = task.metrics_for(jax.ShapeDtypeStruct(target.shape, target.dtype))
    if not isinstance(collection, type):
        return None
    if dataclasses.is_dataclass(collection):
        return tuple(f.name for f in dataclasses.fields(collection)
                     if not f.name.startswith("_"))
    return tuple(getattr(collection, "__annotations__", {}))


def _default_writer(workdir: Optional[str]):
    """TensorBoard files in ``workdir`` (process 0; clu's writer, which needs TensorFlow:
    ``pip install 'bioflax[experiment]'``), else scalars logged at DEBUG."""
    if workdir is None or jax.process_index() > 0:
        return LoggingWriter()
    try:
        from clu import metric_writers  # pylint: disable=import-outside-toplevel
    except ImportError as error:
        raise ImportError(
            f"Trainer(workdir={workdir!r}) writes TensorBoard files, which needs TensorFlow "
            "(pip install 'bioflax[experiment]'); or pass writer= a clu MetricWriter, or "
            "leave workdir unset.") from error
    return metric_writers.create_default_writer(workdir)


def _check_finite(losses: np.ndarray, params_finite: bool, step: int) -> None:
    per_step = np.reshape(losses, (len(losses), -1))  # (steps, seeds)
    bad = np.flatnonzero(~np.isfinite(per_step).all(axis=1))
    if len(bad) or not params_finite:
        at = step + (int(bad[0]) + 1 if len(bad) else len(losses))
        value = per_step[bad[0]].max() if len(bad) else "finite, but the parameters are not"
        raise TrainingDivergedError(at, value)
