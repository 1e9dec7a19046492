"""Training procedures that are not one backward rule, each a
:class:`bioflax.trainer.task.Procedure` (a task's own training step): weight mirrors
(Akrout et al. 2019) and PEPITA (Dellaferrera & Kreiman 2022). DRTP and sDFA are rules
(``'drtp'``, ``get_rule('dfa', signal='sign')``): one gradient step, as every rule.

Chosen by name from :data:`PROCEDURES` (``get_procedure('weight_mirror', mirror_rate=...)``)
and given to ``Task(..., procedure=...)``.
"""

import dataclasses
import math
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from bioflax import rules
from bioflax.trainer.task import Procedure

# What the mirror update reads at a layer's output: its linear response, or the sigmoid of
# it as the reference code's sigmoid network does.
MIRROR_RESPONSES: dict[str, Callable[[jax.Array], jax.Array]] = {
    "linear": lambda a: a, "sigmoid": jax.nn.sigmoid}
_MIRROR_STREAM = 0x6D6972  # folded into a step's key for the mirror noise ('mir')


@dataclasses.dataclass(frozen=True)
class WeightMirror(Procedure):
    """Weight mirrors (Akrout, Wilson, Humphreys, Lillicrap & Tweed 2019): feedback
    alignment whose ``B`` learns ``W`` at every step by the mirror update
    ``B ← (1 − feedback_decay)·B + mirror_rate · x̃ᵀ φ(x̃ W + b)``, ``x̃`` uniform noise on
    ``[−a/2, a/2)`` (``a = noise_amplitude``) of ``mirror_batch`` rows through the layer's
    kernel flattened to ``(fan_in, features)`` (a Conv layer's patches), ``φ`` of
    :data:`MIRROR_RESPONSES`; ``E[x̃ᵀ x̃ W] ∝ W``, so ``B`` turns towards ``W``.
    ``pretrain_steps`` mirror updates run before training, then one per training step.

    The model must be converted with rule ``'fa'``: ``B`` is its ``feedback_kernel`` of
    each Dense and Conv layer (a fixed variable no optimizer touches; this procedure is
    what changes it). The defaults are the reference code's (makrout/
    Deep-Learning-without-Weight-Transport, ``fcnn/FCNN_WM.py``), whose normalisation of
    ``B`` has no effect, so none is applied here.
    """

    mirror_rate: float = 0.01
    noise_amplitude: float = 0.1
    mirror_batch: int = 128
    pretrain_steps: int = 468
    response: str = "linear"
    feedback_decay: float = 0.0

    def __post_init__(self):
        if self.response not in MIRROR_RESPONSES:
            raise ValueError(f"Unknown mirror response {self.response!r}; choose one of "
                             f"{list(MIRROR_RESPONSES)}.")

    def init(self, task, params, model_state, key, sample_input):
        feedback = model_state.get(rules.FEEDBACK_COLLECTION, {})
        self._pairs(params, feedback)  # refuses a model without FA's B
        feedback = jax.lax.fori_loop(
            0, self.pretrain_steps,
            lambda i, fb: self.mirror(params, fb, jax.random.fold_in(key, i)), feedback)
        return params, {**model_state, rules.FEEDBACK_COLLECTION: feedback}

    def update(self, task, state, batch, loss_and_outputs):
        grads, (loss, (outputs, per_example, model_state)) = super().update(
            task, state, batch, loss_and_outputs)
        key = jax.random.fold_in(jax.random.fold_in(
            jax.random.wrap_key_data(state.rng), state.step), _MIRROR_STREAM)
        feedback = self.mirror(state.params, model_state[rules.FEEDBACK_COLLECTION], key)
        return grads, (loss, (outputs, per_example,
                              {**model_state, rules.FEEDBACK_COLLECTION: feedback}))

    def mirror(self, params, feedback, key: jax.Array):
        """``feedback`` after one mirror update of every layer's ``B``."""
        flat = traverse_util.flatten_dict(flax.core.unfreeze(feedback), sep="/")
        for i, (path, kernel, bias) in enumerate(self._pairs(params, feedback)):
            matrix = kernel.reshape(-1, kernel.shape[-1])
            noise = self.noise_amplitude * (jax.random.uniform(
                jax.random.fold_in(key, i), (self.mirror_batch, matrix.shape[0]),
                matrix.dtype) - 0.5)
            response = MIRROR_RESPONSES[self.response](
                noise @ matrix + (0.0 if bias is None else bias))
            old = flat[f"{path}/{rules.FEEDBACK_KERNEL}"]
            flat[f"{path}/{rules.FEEDBACK_KERNEL}"] = (
                (1.0 - self.feedback_decay) * old
                + self.mirror_rate * (noise.T @ response).reshape(old.shape))
        return traverse_util.unflatten_dict(flat, sep="/")

    @staticmethod
    def _pairs(params, feedback) -> list[tuple[str, jax.Array, Any]]:
        """``(path, W, b or None)`` of every layer with a ``feedback_kernel``."""
        weights = traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
        paths = [key.rpartition("/")[0] for key in traverse_util.flatten_dict(
            flax.core.unfreeze(feedback), sep="/") if key.endswith(rules.FEEDBACK_KERNEL)]
        if not paths:
            raise ValueError("Weight mirrors learn feedback alignment's B: convert the model "
                             "with rule 'fa' (a feedback_kernel per layer); this one has "
                             "none.")
        return [(path, weights[f"{path}/kernel"], weights.get(f"{path}/bias"))
                for path in paths]


@dataclasses.dataclass(frozen=True)
class Pepita(Procedure):
    """PEPITA (Dellaferrera & Kreiman 2022), for a chain of ``nn.Dense`` layers (with
    activations and dropout between them): two forward passes, the second on
    ``x + e Fᵀ`` (``e`` the per-example output error ``∂ℓ/∂y``, ``F`` of shape
    ``(input size, outputs)`` fixed, uniform on ``±input_feedback_scale·√(6/input
    size)``, kept in ``model_state['pepita']``), both with the same dropout masks. Layer
    ``l`` with input ``x_l`` (``x_l'`` in the second pass) is updated by
    ``x_l'ᵀ (x_{l+1} − x_{l+1}') / N`` — ``x_{l+1}``, the next layer's input, being this
    layer's activity — and the last layer by ``x_L'ᵀ e' / N``; no backward pass. The
    defaults are the reference code's (GiorgiaD/PEPITA), whose dropout mask is applied
    once here, as in its PyTorch tutorial.
    """

    input_feedback_scale: float = 0.05

    def init(self, task, params, model_state, key, sample_input):
        sample_input = jnp.asarray(sample_input)
        outputs = jax.eval_shape(lambda: task.eval_forward(_StateView(params, model_state),
                                                           sample_input))
        size = math.prod(sample_input.shape[1:])
        bound = self.input_feedback_scale * math.sqrt(6.0 / size)
        feedback = jax.random.uniform(key, (size, outputs.shape[-1]), sample_input.dtype,
                                      -bound, bound)
        return params, {**model_state, "pepita": {"input_feedback": feedback}}

    def update(self, task, state, batch, loss_and_outputs):
        x, targets = batch["input"], batch["target"]
        with _LayerInputs() as first:
            loss, (outputs, per_example, model_state) = loss_and_outputs(state.params)
        error = jax.grad(lambda y: task.loss(y, targets).sum())(outputs)
        feedback = state.model_state["pepita"]["input_feedback"]
        modulated = x + (error.reshape(len(x), -1) @ feedback.T).reshape(x.shape)
        with _LayerInputs() as second:
            modulated_outputs, _ = task.train_forward(state.params, state, modulated)
        modulated_error = jax.grad(lambda y: task.loss(y, targets).sum())(modulated_outputs)
        paths = list(first)
        if list(second) != paths:
            raise ValueError("PEPITA: the two forward passes called different layers.")
        deltas = [first[after] - second[after] for after in paths[1:]] + [modulated_error]
        flat = traverse_util.flatten_dict(flax.core.unfreeze(state.params), sep="/")
        grads = {key: jnp.zeros_like(value) for key, value in flat.items()}
        for path, delta in zip(paths, deltas):
            inputs = second[path].reshape(-1, second[path].shape[-1])
            delta = delta.reshape(-1, delta.shape[-1])
            grads[f"{path}/kernel"] = inputs.T @ delta / len(x)
            if f"{path}/bias" in grads:
                grads[f"{path}/bias"] = delta.sum(0) / len(x)
        return (traverse_util.unflatten_dict(grads, sep="/"),
                (loss, (outputs, per_example, model_state)))


@dataclasses.dataclass(frozen=True)
class _StateView:
    """What :meth:`Task.eval_forward` reads of a state, before the state exists."""

    params: Any
    model_state: dict
    rng: Any = dataclasses.field(default_factory=lambda: np.zeros(2, np.uint32))  # unused key


class _LayerInputs(dict):
    """Inside the block, the input of every ``nn.Dense`` called, by its path in call order."""

    def _record(self, next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
            path = "/".join(context.module.scope.path)
            self.setdefault(path, args[0])
        return next_fun(*args, **kwargs)

    def __enter__(self):
        self._context = nn.intercept_methods(self._record)
        self._context.__enter__()
        return self

    def __exit__(self, *exc):
        return self._context.__exit__(*exc)


# name → procedure class; options as the class's fields.
PROCEDURES: dict[str, type[Procedure]] = {
    "gradient": Procedure, "weight_mirror": WeightMirror, "pepita": Pepita}


def get_procedure(name: str, **options: Any) -> Procedure:
    """The procedure ``name`` of :data:`PROCEDURES` with its options; an unknown name or
    option raises a ``ValueError``."""
    if name not in PROCEDURES:
        raise ValueError(f"Unknown procedure {name!r}; choose one of {list(PROCEDURES)}.")
    procedure = PROCEDURES[name]
    allowed = ({f.name for f in dataclasses.fields(procedure)}
               if dataclasses.is_dataclass(procedure) else set())
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"Procedure {name!r} takes the options {sorted(allowed) or 'none'}; "
                         f"got {unknown}.")
    return procedure(**options)
