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

OptimizerFactory = Callable[[int], optax.GradientTransformation]

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


@dataclasses.dataclass(frozen=True)
class Task:
    """What to train.

    Args:
      module: any Flax module.
      loss: per-example ``loss(outputs, targets)``.
      optimizer: an optax transformation, or ``total_steps -> transformation`` for
        schedules that need the run's length (the trainer calls it).
      metrics: a clu ``Collection`` built from ``loss=``, ``logits=``, ``labels=``, ``mask=``.
      step_metrics: callables with an ``every`` attribute, called inside the compiled step
        on the steps whose index within the epoch is a multiple of ``every``, as
        ``metric(loss_of_params, params, model_state, grads)`` (``loss_of_params`` uses the
        step's batch and random streams), returning a dict of scalars.
      rng_streams: the random streams passed to the module (``make_rng(name)``).
      train_flag: pass ``train=True`` in training and ``train=False`` in evaluation and
        prediction; default: whether ``module.__call__`` has a parameter named ``train``
        (for a wrapper that calls the module in its field ``module``, as
        ``bioflax.convert``'s does, that module's ``__call__``).
    """

    module: nn.Module
    loss: Callable[[jax.Array, jax.Array], jax.Array]
    optimizer: Union[optax.GradientTransformation, OptimizerFactory]
    metrics: type
    step_metrics: Sequence[Any] = ()
    rng_streams: Sequence[str] = ("dropout", "feedback")
    train_flag: Optional[bool] = None

    def __post_init__(self):
        if self.train_flag is None:
            called = getattr(self.module, "module", self.module)
            takes_train = "train" in inspect.signature(called.__call__).parameters
            object.__setattr__(self, "train_flag", takes_train)

    def make_optimizer(self, total_steps: Optional[int]) -> optax.GradientTransformation:
        """The optimizer; a factory is called with ``total_steps``."""
        if isinstance(self.optimizer, optax.GradientTransformation):
            return self.optimizer
        if total_steps is None:
            raise ValueError("Task.optimizer is a factory of the run's length: pass "
                             "total_steps to init_state, or let fit build the state.")
        return self.optimizer(total_steps)

    def _rngs(self, key: jax.Array, first: int = 0) -> dict[str, jax.Array]:
        """Stream ``i`` of ``rng_streams`` from ``fold_in(key, first + i)``."""
        return {name: jax.random.fold_in(key, first + i)
                for i, name in enumerate(self.rng_streams)}

    def _train_kwarg(self, train: bool) -> dict[str, bool]:
        return {"train": train} if self.train_flag else {}

    def init_variables(self, key: jax.Array, sample_input) -> tuple[Any, dict]:
        """``(params, model_state)``: ``'params'`` from ``key``, stream ``i`` from
        ``fold_in(key, 1 + i)``, the module called with ``train=False``."""
        variables = flax.core.unfreeze(self.module.init(
            {"params": key, **self._rngs(key, first=1)}, jnp.asarray(sample_input),
            **self._train_kwarg(False)))
        return variables.pop("params"), variables

    def train_forward(self, params, state: TrainState, inputs) -> tuple[jax.Array, dict]:
        """The outputs in training and the updated ``model_state``: every collection but
        ``'params'`` is mutable; the streams come from ``state.rng`` and ``state.step``."""
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        outputs, updated = self.module.apply(
            {"params": params, **state.model_state}, inputs,
            mutable=list(state.model_state), rngs=self._rngs(key), **self._train_kwarg(True))
        return outputs, {**state.model_state, **flax.core.unfreeze(updated)}

    def eval_forward(self, state: TrainState, inputs) -> jax.Array:
        """The outputs in evaluation: model state read-only, fixed random streams."""
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), _EVAL_STEP)
        return self.module.apply({"params": state.params, **state.model_state}, inputs,
                                 rngs=self._rngs(key), **self._train_kwarg(False))


def init_state(task: Task, key: jax.Array, sample_input,
               total_steps: Optional[int]) -> TrainState:
    """A fresh state: variables from ``key`` (see :meth:`Task.init_variables`), the
    training streams' root ``fold_in(key, 0)``."""
    params, model_state = task.init_variables(key, sample_input)
    optimizer = task.make_optimizer(total_steps)
    return TrainState(step=0, apply_fn=task.module.apply, params=params, tx=optimizer,
                      opt_state=optimizer.init(params), model_state=model_state,
                      rng=jax.random.key_data(jax.random.fold_in(key, 0)))
