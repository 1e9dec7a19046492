"""A generic trainer for Flax models: ``fit`` / ``evaluate`` / ``predict`` on a device mesh.

It knows nothing of feedback rules. A :class:`Task` bundles what to train (module, loss,
metrics, optimizer, optional per-step metrics such as alignment), as Elegy's ``Model``
did; the :class:`Trainer` says how (epochs, logging, callbacks, devices).

Execution model: the batch is sharded over the ``'data'`` axis of a 1-D device mesh and
the state is replicated; XLA inserts the gradient all-reduce. One compiled program runs
``log_every_steps`` training steps (a ``lax.scan``), so the host sees the device once per
logging interval. With ``in_memory=True`` the training split sits on the device and the
program gathers each batch itself; otherwise batches come from the tf.data pipeline.
Both read the examples in the order :func:`bioflax.data.epoch_order` gives, so a run
resumed from a checkpoint at step ``s`` continues with exactly the batches an
uninterrupted run would have seen.
"""

import contextlib
import dataclasses
import functools
import logging
import signal
import sys
import threading
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from clu import parameter_overview
from flax import linen as nn
from flax.training import train_state
from jax.sharding import NamedSharding, PartitionSpec

from bioflax import data as data_lib
from bioflax import metrics as metrics_lib
from bioflax.errors import TrainingDivergedError, TrainingInterrupted

logger = logging.getLogger(__name__)


class TrainState(train_state.TrainState):
    """Flax's TrainState plus ``model_state``: variables that are not trained (e.g. fixed B)."""

    model_state: Any = None


@dataclasses.dataclass(frozen=True)
class Task:
    """What to train: a module, a per-example ``loss(outputs, targets)``, a clu metric
    collection built from ``loss=``, ``logits=``, ``labels=`` (and ``mask=``), an optax
    optimizer, and ``step_metrics``: callables with an ``every`` attribute, called inside
    the compiled step on the steps whose index within the epoch is a multiple of ``every``,
    as ``metric(loss_of_params, params, model_state, grads)``, returning a dict of scalars
    (see ``metrics.Alignment``)."""

    module: nn.Module
    loss: Callable[[jax.Array, jax.Array], jax.Array]
    optimizer: optax.GradientTransformation
    metrics: type
    step_metrics: Sequence[Any] = ()


class Callback:
    """Hooks with the names Lightning users know; each receives the trainer."""

    def on_fit_start(self, trainer: "Trainer", state: TrainState) -> None: ...

    def on_train_chunk_end(self, trainer: "Trainer", state: TrainState, step: int,
                           logs: Mapping[str, float]) -> None: ...

    def on_epoch_end(self, trainer: "Trainer", state: TrainState, epoch: int,
                     logs: Mapping[str, float]) -> None: ...

    def on_fit_end(self, trainer: "Trainer", state: TrainState) -> None: ...


def make_mesh(num_devices: Optional[int] = None) -> jax.sharding.Mesh:
    """A 1-D mesh named ``'data'`` over the first ``num_devices`` devices (default: all)."""
    devices = jax.devices()
    num_devices = num_devices or len(devices)
    if num_devices > len(devices):
        raise ValueError(f"num_devices={num_devices} but only {len(devices)} devices exist.")
    return jax.sharding.Mesh(np.asarray(devices[:num_devices]), ("data",))


def _zeros_like_shapes(shapes):
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


class Trainer:
    """Trains a :class:`Task` data-parallel over every local device.

    Args:
      workdir: where TensorBoard event files go (none: log lines only).
      max_epochs: epochs to train; ``max_steps`` caps the total instead, when given.
      log_every_steps: steps per compiled program and per logged training average.
      callbacks: :class:`Callback` objects, run in order.
      seed: initialises the parameters and orders the training data.
      in_memory: hold the training split on the device and gather batches there.
      limit_train_batches: at most this many steps per epoch (a smoke-run knob).
      limit_eval_batches: at most this many batches per evaluation.
      mesh: the device mesh (default: all devices on a ``'data'`` axis).
      progress_bar: a live tqdm bar (default: when stderr is a terminal).
      report_progress: log steps/s and ETA with ``clu.periodic_actions.ReportProgress``.
      num_seeds: train the seeds ``seed, seed+1, ...`` at once, vmapped in one program
        (in-memory data only): each has its own initialisation and data order, as
        separate runs would; metrics are logged per seed (``seed_i/...``) and averaged.
      writer: a clu ``MetricWriter`` (default: TensorBoard files in ``workdir`` and logs).
    """

    def __init__(self, *, workdir: Optional[str] = None, max_epochs: int = 1,
                 max_steps: Optional[int] = None, log_every_steps: int = 100,
                 callbacks: Sequence[Callback] = (), seed: int = 0, in_memory: bool = True,
                 limit_train_batches: Optional[int] = None,
                 limit_eval_batches: Optional[int] = None,
                 mesh: Optional[jax.sharding.Mesh] = None,
                 progress_bar: Optional[bool] = None, report_progress: bool = True,
                 num_seeds: int = 1, writer=None):
        if log_every_steps <= 0:
            raise ValueError(f"log_every_steps must be positive, got {log_every_steps}.")
        self.workdir = workdir
        self.max_epochs = max_epochs
        self.max_steps = max_steps
        self.log_every_steps = log_every_steps
        self.callbacks = list(callbacks)
        self.seed = seed
        self.in_memory = in_memory
        self.limit_train_batches = limit_train_batches
        self.limit_eval_batches = limit_eval_batches
        self.mesh = mesh or make_mesh()
        self.progress_bar = sys.stderr.isatty() if progress_bar is None else progress_bar
        self.report_progress = report_progress
        if num_seeds < 1 or (num_seeds > 1 and not in_memory):
            raise ValueError(f"num_seeds={num_seeds}: must be >= 1, and training several "
                             "seeds at once needs the in-memory data path (in_memory=True).")
        self.num_seeds = num_seeds
        if writer is None:
            # clu's writers import TensorFlow (for TensorBoard files): only when needed.
            from clu import metric_writers  # pylint: disable=import-outside-toplevel
            writer = metric_writers.create_default_writer(
                workdir, just_logging=jax.process_index() > 0 or workdir is None)
        self.writer = writer
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.input_sharded = NamedSharding(self.mesh, PartitionSpec("data"))
        self.batch_sharded = NamedSharding(
            self.mesh, PartitionSpec("data") if num_seeds == 1 else PartitionSpec(None, "data"))
        self.chunk_sharded = NamedSharding(self.mesh, PartitionSpec(None, "data"))
        self.state: Optional[TrainState] = None
        self.should_stop = False
        self._compiled: dict = {}

    # --- state -------------------------------------------------------------------------

    def init_state(self, task: Task, sample_input: np.ndarray) -> TrainState:
        """Parameters from ``seed`` (stacked for seed, seed+1, ... with ``num_seeds``),
        replicated over the mesh."""
        def variables_of(key):
            variables = flax.core.unfreeze(task.module.init(key, jnp.asarray(sample_input)))
            return variables.pop("params"), variables

        if self.num_seeds == 1:
            params, model_state = variables_of(jax.random.key(self.seed))
            opt_state = task.optimizer.init(params)
        else:
            keys = jnp.stack([jax.random.key(self.seed + i) for i in range(self.num_seeds)])
            params, model_state = jax.vmap(variables_of)(keys)
            opt_state = jax.vmap(task.optimizer.init)(params)
        state = TrainState(step=0, apply_fn=task.module.apply, params=params,
                           tx=task.optimizer, opt_state=opt_state, model_state=model_state)
        return jax.device_put(state, self.replicated)

    def _per_seed(self, function, state_arg: int = 0, batched_args=()):
        """``function`` vmapped over the seed axis of its TrainState argument (the step
        count is shared) and of ``batched_args``; unchanged with one seed."""
        if self.num_seeds == 1:
            return function

        def vmapped(*args):
            state = args[state_arg]
            axes = state.replace(step=None, params=0, opt_state=0, model_state=0)
            in_axes = [0 if i in batched_args else None for i in range(len(args))]
            in_axes[state_arg] = axes
            out = jax.vmap(function, in_axes=tuple(in_axes))(*args)
            if isinstance(out, tuple) and isinstance(out[0], TrainState):
                # Every seed counts the same steps: keep one shared count.
                out = (out[0].replace(step=out[0].step[0]), *out[1:])
            return out

        return vmapped

    # --- compiled programs ---------------------------------------------------------------

    def _train_step(self, task: Task, state: TrainState, batch, due: tuple[bool, ...]):
        """One update; ``due[i]`` says whether ``task.step_metrics[i]`` runs at this step."""
        def loss_and_outputs(params):
            outputs = state.apply_fn({"params": params, **state.model_state}, batch["input"])
            per_example = task.loss(outputs, batch["target"])
            return per_example.mean(), (outputs, per_example)

        (loss, (outputs, per_example)), grads = jax.value_and_grad(
            loss_and_outputs, has_aux=True)(state.params)
        metrics = task.metrics.single_from_model_output(
            loss=per_example, logits=outputs, labels=batch["target"])
        step_metrics = {}
        for metric, is_due in zip(task.step_metrics, due):
            if is_due:
                step_metrics.update(metrics_lib.averages(
                    metric(lambda p: loss_and_outputs(p)[0], state.params, state.model_state,
                           grads), 1))
        return state.apply_gradients(grads=grads), (metrics, step_metrics), loss

    def _train_chunk(self, task: Task, get_batch, plan, state: TrainState, xs):
        """The steps of ``xs`` in order: one ``lax.scan`` per run of ``plan``.

        ``plan`` is a static tuple of ``(length, due)`` runs, so a step metric costs nothing
        on the steps where it is not due, and no step waits on a device-side condition
        (which on GPUs means a round trip to the host).
        """
        def train_step(state, batch, due):
            return self._per_seed(lambda st, b: self._train_step(task, st, b, due),
                                  batched_args=(1,))(state, batch)

        def step(carry, x, due):
            state, (metrics, step_metrics) = carry
            state, (m, s), loss = train_step(state, get_batch(x), due)
            return (state, (metrics.merge(m), metrics_lib.merge_averages(step_metrics, s))), loss

        first = get_batch(jax.tree.map(lambda x: x[0], xs))

        def zero_metrics(due):
            return _zeros_like_shapes(jax.eval_shape(lambda: train_step(state, first, due)[1]))

        metrics, totals = zero_metrics((True,) * len(task.step_metrics))
        losses, offset = [], 0
        for length, due in plan:
            run = jax.tree.map(lambda x, o=offset, n=length: x[o:o + n], xs)
            # A run carries only the step metrics due in it: none on most steps.
            (state, (metrics, due_metrics)), run_losses = jax.lax.scan(
                functools.partial(step, due=due), (state, (metrics, zero_metrics(due)[1])),
                run)
            totals = {**totals, **metrics_lib.merge_averages(
                {name: totals[name] for name in due_metrics}, due_metrics)}
            losses.append(run_losses)
            offset += length
        return state, (metrics, totals), jnp.concatenate(losses), _all_finite(state.params)

    @staticmethod
    def _plan(task: Task, first_step: int, num_steps: int) -> tuple:
        """Runs of consecutive steps that need the same step metrics.

        Steps are counted within the epoch (``first_step`` is the chunk's first step in its
        epoch): a metric is due where that count is a multiple of its ``every``. Chunks
        start at the same places in every epoch, so the plans, and the compiled programs,
        repeat from one epoch to the next.
        """
        plan: list[list] = []
        for step in range(first_step, first_step + num_steps):
            due = tuple(step % metric.every == 0 for metric in task.step_metrics)
            if plan and plan[-1][1] == due:
                plan[-1][0] += 1
            else:
                plan.append([1, due])
        return tuple((length, due) for length, due in plan)

    def _compiled_for(self, task: Task, kind, build):
        """``build()``'s jitted function for ``task``, built once per (task, kind).

        The task is kept with it, so its ``id`` cannot be reused by another task.
        """
        key = (id(task), kind)
        if key not in self._compiled:
            self._compiled[key] = (task, build())
        return self._compiled[key][1]

    def _chunk_program(self, task: Task, in_memory: bool):
        """``program(plan, state, *data)``, compiled once per distinct plan."""
        def build():
            if in_memory:
                def program(plan, state, dataset, indices):
                    def gather(idx):
                        batch = jax.tree.map(lambda a: a[idx], dataset)
                        return jax.lax.with_sharding_constraint(batch, self.batch_sharded)
                    return self._train_chunk(task, gather, plan, state, indices)
            else:
                def program(plan, state, batches):
                    return self._train_chunk(task, lambda b: b, plan, state, batches)
            return jax.jit(program, static_argnums=(0,), donate_argnums=(1,),
                           out_shardings=self.replicated)
        return self._compiled_for(task, ("train", in_memory), build)

    def _eval_program(self, task: Task):
        @self._per_seed
        def evaluate(state, batch):
            outputs = state.apply_fn({"params": state.params, **state.model_state},
                                     batch["input"])
            return task.metrics.single_from_model_output(
                loss=task.loss(outputs, batch["target"]), logits=outputs,
                labels=batch["target"], mask=batch["mask"])
        return self._compiled_for(
            task, "eval", lambda: jax.jit(evaluate, out_shardings=self.replicated))

    # --- data ----------------------------------------------------------------------------

    def _global(self, local_batch, sharding):
        return jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
            local_batch)

    def _chunks(self, train: data_lib.Split, batch_size: int, epoch: int, start: int,
                stop: int) -> Iterator[tuple[tuple, int]]:
        """Data arguments of the chunk program for steps [start, stop) of an epoch, and the
        number of steps each covers (``log_every_steps``, or fewer at the epoch's end)."""
        k = self.log_every_steps
        if self.in_memory:
            orders = np.stack([data_lib.epoch_order(self.seed + i, epoch, len(train))
                               for i in range(self.num_seeds)], axis=1)  # (N, seeds)
            for first in range(start, stop, k):
                n = min(k, stop - first)
                indices = orders[first * batch_size:(first + n) * batch_size].reshape(
                    n, batch_size, self.num_seeds).transpose(0, 2, 1).astype(np.int32)
                if self.num_seeds == 1:
                    indices = indices[:, 0]
                yield (self._dataset_on_device, self._global(indices, self.replicated)), n
            return
        batches = data_lib.train_batches(
            train, batch_size, self.seed, epoch, start_step=start, num_steps=stop - start,
            chunk=k, process_index=jax.process_index(), process_count=jax.process_count())
        # The next chunks become global arrays on a thread while the current one trains.
        for chunk in data_lib.prefetch(batches, lambda c: self._global(c, self.chunk_sharded)):
            yield (chunk,), chunk["input"].shape[0]

    # --- the loop ------------------------------------------------------------------------

    def schedule(self, num_examples: int, batch_size: int) -> tuple[int, int]:
        """``(steps per epoch, total steps)`` that ``fit`` runs on ``num_examples``."""
        steps_per_epoch = data_lib.steps_per_epoch(num_examples, batch_size)
        if self.limit_train_batches:
            steps_per_epoch = min(steps_per_epoch, self.limit_train_batches)
        if steps_per_epoch == 0:
            raise ValueError(f"The training split has {num_examples} examples, fewer than "
                             f"one batch of {batch_size}: lower data.batch_size.")
        total_steps = steps_per_epoch * self.max_epochs
        if self.max_steps is not None:
            total_steps = min(total_steps, self.max_steps)
        return steps_per_epoch, total_steps

    def fit(self, task: Task, train: data_lib.Split, val: Optional[data_lib.Split] = None,
            *, batch_size: int, eval_batch_size: int = 1000,
            initial_state: Optional[TrainState] = None) -> list[dict[str, float]]:
        """Trains ``task`` on ``train``; returns one dict of metrics per finished epoch.

        Starts from ``initial_state`` (for example a restored checkpoint) when given.
        """
        data_lib.check_batch_size(batch_size, self.mesh.size)
        steps_per_epoch, total_steps = self.schedule(len(train), batch_size)
        state = initial_state or self.init_state(task, train.inputs[:1])
        if self.in_memory:
            self._dataset_on_device = self._global(
                {"input": train.inputs, "target": train.targets}, self.replicated)
        program = self._chunk_program(task, self.in_memory)
        parameter_overview.log_parameter_overview(state.params)
        self.should_stop = False
        for callback in self.callbacks:
            callback.on_fit_start(self, state)
        progress = self._progress(total_steps, int(state.step))
        with self._stop_on_signals() as received:
            history = self._loop(task, state, train, val, batch_size, eval_batch_size,
                                 steps_per_epoch, total_steps, program, progress, received)
        return history

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

    def _loop(self, task, state, train, val, batch_size, eval_batch_size, steps_per_epoch,
              total_steps, program, progress, received):
        history = []
        step = int(state.step)
        while step < total_steps and not self.should_stop:
            epoch, in_epoch = divmod(step, steps_per_epoch)
            stop = min(steps_per_epoch, in_epoch + total_steps - step)
            for args, n in self._chunks(train, batch_size, epoch, in_epoch, stop):
                state, *results = program(
                    self._plan(task, step - epoch * steps_per_epoch, n), state, *args)
                # One transfer for everything the host reads of this chunk.
                (metrics, step_metrics), losses, params_finite = jax.device_get(results)
                self._check_finite(losses, bool(params_finite), step)
                step += n
                logs = self._scalars({**{f"train/{k}": v for k, v in
                                         metrics_lib.compute_collection(metrics).items()},
                                      **metrics_lib.compute_averages(step_metrics)})
                self.writer.write_scalars(step, logs)
                progress(step, epoch, logs)
                for callback in self.callbacks:
                    callback.on_train_chunk_end(self, state, step, logs)
                if received:
                    break
            if step % steps_per_epoch == 0 and not received:
                logs = {"epoch": epoch + 1, **logs}
                if val is not None and len(val):
                    val_logs = self._evaluate_state(task, state, val, eval_batch_size,
                                                    prefix="val/")
                    logs.update(val_logs)
                    self.writer.write_scalars(step, val_logs)
                history.append(logs)
                for callback in self.callbacks:
                    callback.on_epoch_end(self, state, epoch, logs)
        self.writer.flush()
        progress.close()
        self.state = state
        for callback in self.callbacks:
            callback.on_fit_end(self, state)
        self.writer.flush()
        if received:
            raise TrainingInterrupted(received[0], step)
        return history

    def _scalars(self, values) -> dict[str, float]:
        """Metric values as floats; with several seeds, their mean under the metric's name
        and each seed's value under ``seed_i/NAME``."""
        if self.num_seeds == 1:
            return {name: float(value) for name, value in values.items()}
        logs = {name: float(np.mean(value)) for name, value in values.items()}
        for name, value in values.items():
            logs.update({f"seed_{i}/{name}": float(v) for i, v in enumerate(np.ravel(value))})
        return logs

    def _check_finite(self, losses: np.ndarray, params_finite: bool, step: int) -> None:
        per_step = np.reshape(losses, (len(losses), -1))  # (steps, seeds)
        bad = np.flatnonzero(~np.isfinite(per_step).all(axis=1))
        if len(bad) or not params_finite:
            at = step + (int(bad[0]) + 1 if len(bad) else len(losses))
            value = per_step[bad[0]].max() if len(bad) else "finite, but the parameters are not"
            raise TrainingDivergedError(
                f"Training diverged at step {at}: the loss is {value}. Nothing from this "
                "step on was saved; the latest checkpoint is from before it. Lower the "
                "learning rate (--config.optimizer.learning_rate) or the initial weight "
                "scale and run again; the run resumes from that checkpoint.")

    def _progress(self, total_steps: int, first_step: int):
        report = None
        if self.report_progress:
            from clu import periodic_actions  # pylint: disable=import-outside-toplevel
            report = periodic_actions.ReportProgress(num_train_steps=total_steps,
                                                     writer=self.writer, every_secs=30.0)
        bar = None
        if self.progress_bar:
            import tqdm  # pylint: disable=import-outside-toplevel
            bar = tqdm.tqdm(total=total_steps, initial=first_step, unit="step",
                            dynamic_ncols=True)

        class Progress:
            def __call__(self, step, epoch, logs):
                if report is not None:
                    report(step)
                if bar is not None:
                    bar.set_description(f"epoch {epoch + 1}")
                    bar.set_postfix(loss=f"{logs.get('train/loss', float('nan')):.4f}")
                    bar.update(step - bar.n)

            def close(self):
                if bar is not None:
                    bar.close()

        return Progress()

    # --- evaluation and prediction -------------------------------------------------------

    def _evaluate_state(self, task: Task, state: TrainState, split: data_lib.Split,
                        batch_size: int, prefix: str = "") -> dict[str, float]:
        data_lib.check_batch_size(batch_size, self.mesh.size)
        evaluate = self._eval_program(task)
        total = None
        batches = data_lib.eval_batches(split, batch_size, process_index=jax.process_index(),
                                        process_count=jax.process_count())
        for index, batch in enumerate(batches):
            if self.limit_eval_batches and index >= self.limit_eval_batches:
                break
            metrics = evaluate(state, self._global(batch, self.input_sharded))
            total = metrics if total is None else total.merge(metrics)
        return self._scalars({prefix + name: value for name, value in
                              metrics_lib.compute_collection(jax.device_get(total)).items()})

    def evaluate(self, task: Task, split: data_lib.Split, *, batch_size: int = 1000,
                 state: Optional[TrainState] = None, prefix: str = "") -> dict[str, float]:
        """Metrics of ``state`` (default: the fitted state) over every example of ``split``,
        named ``prefix + name`` (and ``seed_i/`` + that with several seeds)."""
        state = state or self._fitted_state()
        return self._evaluate_state(task, state, split, batch_size, prefix)

    def predict(self, task: Task, inputs: np.ndarray, *, batch_size: int = 1000,
                state: Optional[TrainState] = None) -> np.ndarray:
        """The module's outputs for ``inputs`` (``(batch, ...)``, or ``(seeds, batch, ...)``
        with several seeds), computed in padded, sharded batches."""
        state = state or self._fitted_state()
        split = data_lib.Split(inputs=np.asarray(inputs, np.float32),
                               targets=np.zeros(len(inputs), np.int32))
        apply = self._compiled_for(task, "predict", lambda: jax.jit(self._per_seed(
            lambda state, x: state.apply_fn({"params": state.params, **state.model_state}, x)),
            out_shardings=self.replicated))
        outputs = []
        for batch in data_lib.eval_batches(split, batch_size, process_index=jax.process_index(),
                                           process_count=jax.process_count()):
            out = apply(state, self._global(batch["input"], self.input_sharded))
            outputs.append(np.asarray(out)[..., batch["mask"] > 0, :])
        return np.concatenate(outputs, axis=-2)

    def _fitted_state(self) -> TrainState:
        if self.state is None:
            raise RuntimeError("No trained state: call fit() first or pass state=.")
        return self.state
