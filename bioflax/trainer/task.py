"""What the trainer trains: a :class:`Task` (model, loss, metrics, optimizer) and its
:class:`TrainState`, and how the module is called in training and in evaluation."""

import dataclasses
import inspect
from typing import Any, Callable, Optional, Sequence, Union

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax.training import train_state

from bioflax.trainer import metrics as metrics_lib
from bioflax.trainer.nnx_adapter import NnxAdapter, as_linen


@dataclasses.dataclass(frozen=True)
class OptimizerFactory:
    """An optimizer made from the run's length, for schedules that need it:
    ``Task(optimizer=OptimizerFactory(lambda total_steps: optax.adam(
    optax.cosine_decay_schedule(1e-3, total_steps))))``; the trainer calls ``make``."""

    make: Callable[[int], optax.GradientTransformation]

    def __call__(self, total_steps: int) -> optax.GradientTransformation:
        return self.make(total_steps)


# How the module is told its mode: a parameter of its ``__call__`` by one of these names,
# mapped to its value in training (evaluation passes the opposite).
TRAIN_FLAGS = {"train": True, "training": True, "deterministic": False}

# The key an evaluation or prediction pass draws its random streams from (a step number no
# training run reaches), so that evaluating twice gives the same numbers.
_EVAL_STEP = np.uint32(0xFFFFFFFF)  # NumPy: importing must not start the JAX backend


class TrainState(train_state.TrainState):
    """Flax's TrainState plus ``model_state``, every variable collection but ``'params'``
    (fixed feedback matrices, BatchNorm's ``batch_stats``), and ``rng``, the key data each
    step's random streams are derived from (with the step number, so a resumed run draws
    the same numbers)."""

    model_state: Any = None
    rng: Any = None


LossAndOutputs = Callable[[Any], tuple[jax.Array, tuple[jax.Array, jax.Array, dict]]]


class Procedure:
    """How a training step turns a batch into the updates the optimizer applies, as a
    LightningModule's ``training_step``; run inside the trainer's compiled, sharded and
    checkpointed loop. This base class is the gradient step every backward rule takes;
    procedures that are not one gradient (weight mirrors, PEPITA, Forward-Forward)
    override :meth:`update` and, where they need them, :meth:`init` and :meth:`predict`.
    """

    def init(self, task: "Task", params, model_state: dict, key: jax.Array,
             sample_input) -> tuple[Any, dict]:
        """The initial ``(params, model_state)`` from the module's (unchanged here)."""
        del task, key, sample_input
        return params, model_state

    def update(self, task: "Task", state: "TrainState", batch,
               loss_and_outputs: LossAndOutputs):
        """``(updates, (loss, (outputs, per-example loss, model_state)))``: updates shaped
        as ``state.params`` for the optimizer, and the step's outputs and new model state.
        ``loss_and_outputs(params)`` is the batch's mean loss through the task's module in
        training mode, with those outputs."""
        del task, batch
        (loss, aux), grads = jax.value_and_grad(loss_and_outputs, has_aux=True)(state.params)
        return grads, (loss, aux)

    def predict(self, task: "Task", state: "TrainState", inputs) -> jax.Array:
        """The outputs in evaluation and prediction: the module's."""
        return task.eval_forward(state, inputs)


def _call_parameters(module: nn.Module) -> Sequence[str]:
    """The parameter names of ``module.__call__``; for a wrapper that names no mode flag
    and passes ``**kwargs`` on to a ``module`` field (as ``bioflax.convert``'s does), the
    wrapped module's."""
    parameters = inspect.signature(module.__call__).parameters
    forwards = not any(name in parameters for name in TRAIN_FLAGS) and any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    inner = getattr(module, "module", None)
    return _call_parameters(inner) if forwards and isinstance(inner, nn.Module) else parameters


@dataclasses.dataclass(frozen=True)
class Task:
    """What to train.

    Args:
      module: any Flax module: a Linen one, or an NNX model (an ``nnx.Module`` instance,
        ``bioflax.convert``'s too), which the task holds in an
        :class:`~bioflax.trainer.nnx_adapter.NnxAdapter`: its variables as they are when
        the task is made are the initial state (the trainer's seed orders the data and
        draws the random streams), ``model.train()`` / ``model.eval()`` set the mode.
      loss: per-example ``loss(outputs, targets)``.
      optimizer: an optax ``GradientTransformation``, or an :class:`OptimizerFactory` of
        the run's length (the trainer calls it).
      metrics: a clu ``Collection`` built from ``loss=``, ``logits=``, ``labels=``,
        ``mask=``; default (None): loss and accuracy for integer targets, the loss alone
        otherwise (:meth:`metrics_for`).
      step_metrics: callables with an ``every`` attribute, called inside the compiled step
        on the steps whose index within the epoch is a multiple of ``every``, as
        ``metric(loss_of_params, params, model_state, grads)`` (``loss_of_params`` uses the
        step's batch and random streams), returning a dict of scalars.
      rng_streams: the random streams passed to the module (``make_rng(name)``); an NNX
        model's own streams (the names of its ``nnx.Rngs``) are added.
      procedure: how a step makes its updates (:class:`Procedure`; default: the gradient
        of the loss, which is what every rule of ``bioflax.convert`` trains by).
      train_flag: the keyword that tells the module its mode, one of :data:`TRAIN_FLAGS`
        (``train``/``training`` get True in training, ``deterministic`` gets False; the
        opposite in evaluation and prediction), or False for none; default: the first of
        them that ``module.__call__`` takes (for a wrapper that takes none of them but
        ``**kwargs`` and calls the module in its field ``module``, as ``bioflax.convert``'s
        does, that module's ``__call__``);
        ``train`` for an NNX model.
    """

    module: Union[nn.Module, NnxAdapter]
    loss: Callable[[jax.Array, jax.Array], jax.Array]
    optimizer: Union[optax.GradientTransformation, OptimizerFactory]
    metrics: Optional[type] = None
    step_metrics: Sequence[Any] = ()
    rng_streams: Sequence[str] = ("dropout", "feedback")
    train_flag: Union[str, bool, None] = None
    procedure: Procedure = Procedure()

    def __post_init__(self):
        object.__setattr__(self, "module", as_linen(self.module))
        if isinstance(self.module, NnxAdapter):
            object.__setattr__(self, "rng_streams", tuple(dict.fromkeys(
                (*self.rng_streams, *self.module.streams))))
        if not isinstance(self.optimizer, (optax.GradientTransformation, OptimizerFactory)):
            name = getattr(self.optimizer, "__qualname__", type(self.optimizer).__name__)
            raise TypeError(
                f"Task.optimizer got {name}, not an optimizer: pass an optax transformation "
                "(call the constructor, e.g. optax.adam(1e-3)), or wrap a function of the "
                "run's length in bioflax.OptimizerFactory.")
        object.__setattr__(self, "train_flag", self._resolve_train_flag())

    def _resolve_train_flag(self) -> Union[str, bool]:
        if isinstance(self.module, NnxAdapter) or self.train_flag is True:
            return "train"
        if self.train_flag is None:
            parameters = _call_parameters(self.module)
            return next((name for name in TRAIN_FLAGS if name in parameters), False)
        if self.train_flag is not False and self.train_flag not in TRAIN_FLAGS:
            raise ValueError(f"Task.train_flag={self.train_flag!r}: give one of "
                             f"{list(TRAIN_FLAGS)}, or False when the module takes none.")
        return self.train_flag

    def make_optimizer(self, total_steps: Optional[int]) -> optax.GradientTransformation:
        """The optimizer; a factory is called with ``total_steps``."""
        if isinstance(self.optimizer, optax.GradientTransformation):
            return self.optimizer
        if total_steps is None:
            raise ValueError("Task.optimizer is a factory of the run's length: pass "
                             "total_steps to init_state, or let fit build the state.")
        return self.optimizer(total_steps)

    def metrics_for(self, targets) -> type:
        """The metric collection for ``targets`` (an array or its ShapeDtypeStruct):
        ``metrics``, or by default :class:`ClassificationMetrics` for integer targets (token
        accuracy for sequences) and :class:`RegressionMetrics` otherwise."""
        if self.metrics is not None:
            return self.metrics
        if not jnp.issubdtype(targets.dtype, jnp.integer):
            return metrics_lib.RegressionMetrics
        return (metrics_lib.ClassificationMetrics if len(targets.shape) <= 1
                else metrics_lib.LanguageModelingMetrics)

    def _rngs(self, key: jax.Array, first: int = 0) -> dict[str, jax.Array]:
        """Stream ``i`` of ``rng_streams`` from ``fold_in(key, first + i)``."""
        return {name: jax.random.fold_in(key, first + i)
                for i, name in enumerate(self.rng_streams)}

    def mode_kwargs(self, train: bool) -> dict[str, bool]:
        """The keyword argument that calls the module in training (``train``) or evaluation
        mode: ``{train_flag: ...}``, or ``{}`` when the module takes none."""
        if not self.train_flag:
            return {}
        return {self.train_flag: train == TRAIN_FLAGS[self.train_flag]}

    def init_variables(self, key: jax.Array, sample_input) -> tuple[Any, dict]:
        """``(params, model_state)``: ``'params'`` from ``key``, stream ``i`` from
        ``fold_in(key, 1 + i)``, the module called with ``train=False``."""
        variables = flax.core.unfreeze(self.module.init(
            {"params": key, **self._rngs(key, first=1)}, jnp.asarray(sample_input),
            **self.mode_kwargs(False)))
        return variables.pop("params"), variables

    def train_forward(self, params, state: TrainState, inputs) -> tuple[jax.Array, dict]:
        """The outputs in training and the updated ``model_state``: every collection but
        ``'params'`` is mutable; the streams come from ``state.rng`` and ``state.step``."""
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        outputs, updated = self.module.apply(
            {"params": params, **state.model_state}, inputs,
            mutable=list(state.model_state), rngs=self._rngs(key), **self.mode_kwargs(True))
        return outputs, {**state.model_state, **flax.core.unfreeze(updated)}

    def eval_forward(self, state: TrainState, inputs) -> jax.Array:
        """The outputs in evaluation: model state read-only, fixed random streams."""
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), _EVAL_STEP)
        return self.module.apply({"params": state.params, **state.model_state}, inputs,
                                 rngs=self._rngs(key), **self.mode_kwargs(False))


def init_state(task: Task, key: jax.Array, sample_input,
               total_steps: Optional[int]) -> TrainState:
    """A fresh state: variables from ``key`` (see :meth:`Task.init_variables`), the
    training streams' root ``fold_in(key, 0)``."""
    params, model_state = task.procedure.init(
        task, *task.init_variables(key, sample_input),
        jax.random.fold_in(key, 1 + len(task.rng_streams)),
        sample_input)
    optimizer = task.make_optimizer(total_steps)
    return TrainState(step=0, apply_fn=task.module.apply, params=params, tx=optimizer,
                      opt_state=optimizer.init(params), model_state=model_state,
                      rng=jax.random.key_data(jax.random.fold_in(key, 0)))
