"""The compiled programs of a :class:`Task`: training chunks, evaluation, prediction.

A training chunk is one jitted program of many steps (``lax.scan``), so the host sees the
device once per chunk. Step metrics (e.g. alignment) run only on the steps where they are
due: a static *plan* splits the chunk into runs of steps that need the same metrics, each
its own scan, so no step waits on a device-side condition. With ``num_seeds > 1`` every
program is vmapped over a leading seed axis of the state (the step count is shared).
"""

import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bioflax import targets
from bioflax.trainer import metrics as metrics_lib
from bioflax.trainer.nnx_adapter import NnxAdapter
from bioflax.trainer.placement import Placement
from bioflax.trainer.task import Task, TrainState, init_state


def plan(task: Task, first_step: int, num_steps: int) -> tuple:
    """Runs ``(length, due)`` of consecutive steps that need the same step metrics.

    Steps are counted within the epoch (``first_step`` is the chunk's first step in its
    epoch): a metric is due where that count is a multiple of its ``every``. Chunks start
    at the same places in every epoch, so plans, and compiled programs, repeat.
    """
    runs: list[list] = []
    for step in range(first_step, first_step + num_steps):
        due = tuple(step % metric.every == 0 for metric in task.step_metrics)
        if runs and runs[-1][1] == due:
            runs[-1][0] += 1
        else:
            runs.append([1, due])
    return tuple((length, due) for length, due in runs)


def _zeros_like_shapes(shapes):
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


class Programs:
    """The jitted functions of ``task`` on ``placement``, each compiled once, with XLA's
    ``compiler_options`` (``jax.jit``'s; None: XLA's defaults)."""

    def __init__(self, task: Task, placement: Placement,
                 compiler_options: Optional[dict] = None):
        self.task = task
        self.placement = placement
        self._jit = functools.partial(jax.jit, compiler_options=compiler_options or None)
        self._compiled: dict = {}

    def _cached(self, kind, build):
        if kind not in self._compiled:
            self._compiled[kind] = build()
        return self._compiled[kind]

    def init_state(self, seeds: Sequence[int], sample_input,
                   total_steps: Optional[int]) -> TrainState:
        """The state of ``seeds`` (stacked when several), replicated over the mesh."""
        if len(seeds) > 1 and isinstance(self.task.module, NnxAdapter):
            raise ValueError(
                f"num_seeds={len(seeds)}: seeds trained at once start from their own "
                "initialisations, and an NNX model brings its own: train one model per seed "
                "(each built from its seed), with num_seeds=1.")

        def one(key):
            return init_state(self.task, key, sample_input, total_steps)

        if len(seeds) == 1:
            state = one(jax.random.key(seeds[0]))
        else:
            state = jax.vmap(one)(jnp.stack([jax.random.key(seed) for seed in seeds]))
            state = state.replace(step=0)
        return jax.device_put(state, self.placement.replicated)

    def _per_seed(self, function, batched_args=()):
        """``function(state, *args)`` vmapped over the seed axis of the state (not its step
        count) and of ``batched_args``; unchanged with one seed."""
        if self.placement.num_seeds == 1:
            return function

        def vmapped(state, *args):
            axes = state.replace(step=None, params=0, opt_state=0, model_state=0, rng=0)
            in_axes = (axes, *[0 if i in batched_args else None for i in range(len(args))])
            out = jax.vmap(function, in_axes=in_axes)(state, *args)
            if isinstance(out, tuple) and isinstance(out[0], TrainState):
                out = (out[0].replace(step=out[0].step[0]), *out[1:])
            return out

        return vmapped

    def _train_step(self, state: TrainState, batch, due: tuple[bool, ...], step_metrics):
        """One update; ``due[i]``: whether ``step_metrics[i]`` runs at this step."""
        task = self.task

        def loss_and_outputs(params):
            with targets.visible(batch["target"]):  # for rules that read them (DRTP)
                outputs, model_state = task.train_forward(params, state, batch["input"])
            per_example = task.loss(outputs, batch["target"])
            return per_example.mean(), (outputs, per_example, model_state)

        grads, (loss, (outputs, per_example, model_state)) = task.procedure.update(
            task, state, batch, loss_and_outputs)
        metrics = task.metrics_for(batch["target"]).single_from_model_output(
            loss=per_example, logits=outputs, labels=batch["target"])
        values = {}
        for metric, is_due in zip(step_metrics, due):
            if is_due:
                values.update(metrics_lib.averages(
                    metric(lambda p: loss_and_outputs(p)[0], state.params, state.model_state,
                           grads), 1))
        state = state.apply_gradients(grads=grads).replace(model_state=model_state)
        return state, (metrics, values), loss

    def _bound_step_metrics(self, inputs: jax.Array) -> list:
        """The task's step metrics, those with a ``bind(module, inputs, **kwargs)`` method
        bound to the module called on ``inputs`` (the alignment metric finds the output
        layer so)."""
        task = self.task
        module, kwargs = task.module, task.mode_kwargs(False)
        if isinstance(module, NnxAdapter):  # the NNX model itself, which sets its own mode
            module, kwargs = module.merge(module.variables()), {}
        shape = inputs.shape[1:] if self.placement.num_seeds > 1 else inputs.shape  # seed axis
        return [metric.bind(module, jnp.zeros(shape, inputs.dtype), **kwargs)
                if hasattr(metric, "bind") else metric for metric in task.step_metrics]

    def _train_chunk(self, get_batch, steps_plan, state: TrainState, xs):
        first = get_batch(jax.tree.map(lambda x: x[0], xs))
        step_metrics = self._bound_step_metrics(first["input"])

        def train_step(state, batch, due):
            return self._per_seed(functools.partial(self._train_step, due=due,
                                                    step_metrics=step_metrics),
                                  batched_args=(0,))(state, batch)

        def step(carry, x, due):
            state, (metrics, averages) = carry
            state, (m, s), loss = train_step(state, get_batch(x), due)
            return (state, (metrics.merge(m), metrics_lib.merge_averages(averages, s))), loss

        def zero_metrics(due):
            return _zeros_like_shapes(jax.eval_shape(lambda: train_step(state, first, due)[1]))

        metrics, totals = zero_metrics((True,) * len(self.task.step_metrics))
        losses, offset = [], 0
        for length, due in steps_plan:
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

    def train_chunk(self, source_type: type):
        """``program(plan, state, data, xs) -> (state, (metrics, step_metrics), losses,
        params_finite)`` for a :class:`DataSource` type; compiled once per plan, the state
        donated."""
        def build():
            def program(steps_plan, state, data, xs):
                return self._train_chunk(
                    lambda x: source_type.batch(data, x, self.placement), steps_plan, state, xs)
            return self._jit(program, static_argnums=(0,), donate_argnums=(1,),
                             out_shardings=self.placement.replicated)
        return self._cached(("train", source_type), build)

    def evaluate(self):
        """``program(state, batch)``: the metric collection of one masked batch."""
        task = self.task

        @self._per_seed
        def evaluate(state, batch):
            outputs = task.procedure.predict(task, state, batch["input"])
            return task.metrics_for(batch["target"]).single_from_model_output(
                loss=task.loss(outputs, batch["target"]), logits=outputs,
                labels=batch["target"], mask=batch["mask"])
        return self._cached("eval", lambda: self._jit(
            evaluate, out_shardings=self.placement.replicated))

    def predict(self):
        """``program(state, inputs)``: the module's outputs in evaluation mode."""
        def predict(state, inputs):
            return self.task.procedure.predict(self.task, state, inputs)
        return self._cached("predict", lambda: self._jit(
            self._per_seed(predict), out_shardings=self.placement.replicated))


def scalars(values: dict[str, Any], num_seeds: int) -> dict[str, float]:
    """Metric values as floats; with several seeds their mean under the metric's name and
    each seed's value under ``seed_i/NAME``."""
    if num_seeds == 1:
        return {name: float(value) for name, value in values.items()}
    logs = {name: float(np.mean(value)) for name, value in values.items()}
    for name, value in values.items():
        logs.update({f"seed_{i}/{name}": float(v) for i, v in enumerate(np.ravel(value))})
    return logs
