"""The training loop: :class:`Trainer` runs a :class:`Task`'s compiled chunks over a
:class:`DataSource`, evaluates each epoch, calls the callbacks and resumes from a
checkpoint callback."""

import collections
import contextlib
import dataclasses
import logging
import signal
import threading
from typing import Any, Optional, Sequence, Union

import jax
import numpy as np
from clu import parameter_overview

from bioflax.errors import TrainingDivergedError, TrainingInterrupted
from bioflax.trainer import durations as durations_lib
from bioflax.trainer import metrics as metrics_lib
from bioflax.trainer.arrays import ArrayData, check_batch_size
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


class Trainer:
    """Trains a :class:`Task` data-parallel over a device mesh.

    Args:
      workdir: where TensorBoard event files go when no ``writer`` is given (this needs
        TensorFlow, the ``[experiment]`` extra; none: scalars logged at DEBUG).
      max_epochs: epochs to train; ``max_steps`` caps the total instead, when given.
      log_every_steps: steps per compiled program and per logged training average.
      callbacks: :class:`Callback` objects, run in order (checkpoint callbacks last).
      seed: initialises the model state and orders the training data.
      limit_train_batches: at most this many steps per epoch (a smoke-run knob).
      limit_eval_batches: at most this many batches per evaluation.
      mesh: the device mesh (default: all devices on a ``'data'`` axis).
      progress_bar: a live tqdm bar (default: when stderr is a terminal); one line per
        epoch either way, with ``epoch_summary(logs)`` added to it.
      report_progress: write steps/s and the time left to the writer.
      num_seeds: train the seeds ``seed, seed+1, ...`` at once, vmapped in one program:
        each has its own initialisation, data order and random streams, as separate runs
        would; metrics are logged per seed (``seed_i/...``) and averaged.
      writer: a clu ``MetricWriter`` (default: TensorBoard files in ``workdir`` and logs).
      compiler_options: XLA options for every compiled program, as ``jax.jit`` takes them
        (e.g. ``bioflax.conv.CPU_COMPILER_OPTIONS``; None: XLA's defaults).
    """

    def __init__(self, *, workdir: Optional[str] = None, max_epochs: int = 1,
                 max_steps: Optional[int] = None, log_every_steps: int = 100,
                 callbacks: Sequence[Callback] = (), seed: int = 0,
                 limit_train_batches: Optional[int] = None,
                 limit_eval_batches: Optional[int] = None,
                 mesh: Optional[jax.sharding.Mesh] = None,
                 progress_bar: Optional[bool] = None, epoch_summary=None,
                 report_progress: bool = True, num_seeds: int = 1, writer=None,
                 compiler_options: Optional[dict] = None):
        if log_every_steps <= 0:
            raise ValueError(f"log_every_steps must be positive, got {log_every_steps}.")
        if num_seeds < 1:
            raise ValueError(f"num_seeds must be >= 1, got {num_seeds}.")
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
        console = [Console(progress_bar, epoch_summary)]
        console += [ReportProgress()] if report_progress else []
        user = list(callbacks)
        self.callbacks = ([c for c in user if not isinstance(c, CheckpointCallback)] + console
                          + [c for c in user if isinstance(c, CheckpointCallback)])
        self.durations: Optional[durations_lib.Durations] = None
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

    def fit(self, task: Task, train: Union[DataSource, ArrayData],
            val: Optional[ArrayData] = None, *, batch_size: int,
            eval_batch_size: int = 1000, state: Optional[TrainState] = None,
            resume: bool = False) -> FitResult:
        """Trains ``task`` on ``train`` (a :class:`DataSource`; an :class:`ArrayData` is held
        in memory), evaluating on ``val`` (anything :meth:`evaluate` takes) after each epoch.

        Starts from ``state`` when given, else from a fresh state, or, with ``resume=True``
        (opt-in, as Lightning's ``ckpt_path``), from the newest checkpoint of a
        :class:`CheckpointCallback` (its callbacks' states too).
        """
        source = train if isinstance(train, DataSource) else InMemory(train)
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
            if step % steps_per_epoch == 0:  # a whole epoch, even if a signal came
                logs = {"epoch": epoch + 1, **logs}
                if val is not None and len(val):
                    val_logs = self.evaluate(task, state, val, batch_size=eval_batch_size,
                                             prefix="val/")
                    logs.update(val_logs)
                    self.writer.write_scalars(step, val_logs)
                history.append(logs)
                for callback in self.callbacks:
                    callback.on_epoch_end(self, state, epoch, logs)
        return state, history

    # --- evaluation and prediction -------------------------------------------------------

    def evaluate(self, task: Task, state: TrainState, data, *,
                 batch_size: int = 1000, prefix: str = "") -> dict[str, float]:
        """Metrics of ``state`` over every example of ``data`` (an :class:`ArrayData`, or
        anything with its ``eval_batches``), named ``prefix + name`` (and ``seed_i/`` +
        that with several seeds)."""
        check_batch_size(batch_size, self.mesh.size, name="eval_batch_size")
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
        inputs = np.asarray(inputs)
        if inputs.dtype == np.float64 and not jax.config.jax_enable_x64:
            inputs = inputs.astype(np.float32)
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
