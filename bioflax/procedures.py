"""Training procedures that are not one backward rule, each a
:class:`bioflax.trainer.task.Procedure` (a task's own training step): weight mirrors
(Akrout et al. 2019), PEPITA (Dellaferrera & Kreiman 2022) and Forward-Forward (Hinton
2022). DRTP and sDFA are rules
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
import optax
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


_NEGATIVE_STREAM = 0x6E6567  # folded into a step's key for the negative labels ('neg')
# How Forward-Forward's prediction picks a label: the linear classifier on the input with
# the neutral label, or the label whose input gives the most goodness (Hinton 2022).
FF_PREDICTIONS = ("classifier", "goodness")


@dataclasses.dataclass(frozen=True)
class ForwardForward(Procedure):
    """Forward-Forward (Hinton 2022) as loeweX/Forward-Forward implements it, for
    :class:`bioflax.zoo.ForwardForwardNet`: the label is written into the first
    ``num_classes`` input values (one-hot for positive data, a label drawn uniformly from
    the wrong ones for negative data, ``neutral_label`` everywhere for the classifier's
    input); layer ``l``'s loss is the binary cross-entropy of ``Σ z_l² − width_l`` (its
    goodness over the threshold) against 1 for positive and 0 for negative examples, plus
    ``peer_normalization`` times ``mean((mean(r) − r)²)`` of the running mean ``r`` of its
    positive activities (``model_state['forward_forward']``); the classifier adds its
    cross-entropy. The network's ``stop_gradient`` between layers keeps every gradient
    local. ``prediction`` (:data:`FF_PREDICTIONS`) says how evaluation picks a label.
    """

    num_classes: int = 10
    peer_normalization: float = 0.03
    peer_momentum: float = 0.9
    neutral_label: float = 0.1
    prediction: str = "classifier"

    def __post_init__(self):
        if self.prediction not in FF_PREDICTIONS:
            raise ValueError(f"Unknown Forward-Forward prediction {self.prediction!r}; "
                             f"choose one of {list(FF_PREDICTIONS)}.")

    def init(self, task, params, model_state, key, sample_input):
        outputs = jax.eval_shape(lambda: task.eval_forward(
            _StateView(params, model_state), jnp.asarray(sample_input)))
        if not (isinstance(outputs, tuple) and len(outputs) == 2):
            raise ValueError("Forward-Forward needs a network that returns (logits, "
                             "activities of each layer), as bioflax.zoo.ForwardForwardNet "
                             f"(model.name='forward_forward'); this one returns {outputs}.")
        running = {str(i): jnp.full(a.shape[-1], 0.5, a.dtype)
                   for i, a in enumerate(outputs[1])}
        return params, {**model_state, "forward_forward": running}

    def embed(self, x: jax.Array, label_values: jax.Array) -> jax.Array:
        """``x`` with its first ``num_classes`` values (flattened) replaced by
        ``label_values`` ``(N, num_classes)``."""
        flat = jnp.asarray(x).reshape((x.shape[0], -1))
        flat = flat.at[:, :self.num_classes].set(jnp.asarray(label_values, flat.dtype))
        return flat.reshape(x.shape)

    def loss(self, task, params, state, x, labels, wrong_labels):
        """``(total loss, (logits on the neutral input, per-example classifier loss, new
        model state))`` for positive ``labels`` and negative ``wrong_labels``."""
        n = self.num_classes
        positive = self.embed(x, jax.nn.one_hot(labels, n))
        negative = self.embed(x, jax.nn.one_hot(wrong_labels, n))
        neutral = self.embed(x, jnp.full((len(x), n), self.neutral_label))
        (_, activities), model_state = task.train_forward(
            params, state, jnp.concatenate([positive, negative]))
        (logits, _), _ = task.train_forward(params, state, neutral)
        is_positive = jnp.concatenate([jnp.ones(len(x)), jnp.zeros(len(x))])
        total, running = 0.0, {}
        for i, activity in enumerate(activities):
            goodness = jnp.sum(jnp.square(activity), axis=-1) - activity.shape[-1]
            total += optax.sigmoid_binary_cross_entropy(goodness, is_positive).mean()
            mean = (self.peer_momentum * jax.lax.stop_gradient(
                state.model_state["forward_forward"][str(i)])
                + (1 - self.peer_momentum) * activity[:len(x)].mean(axis=0))
            total += self.peer_normalization * jnp.mean(jnp.square(jnp.mean(mean) - mean))
            running[str(i)] = jax.lax.stop_gradient(mean)
        per_example = task.loss(logits, labels)
        return total + per_example.mean(), (logits, per_example,
                                             {**model_state, "forward_forward": running})

    def update(self, task, state, batch, loss_and_outputs):
        x, labels = batch["input"], batch["target"]
        if not jnp.issubdtype(labels.dtype, jnp.integer):
            raise ValueError("Forward-Forward writes the class label into the input: its "
                             f"targets must be integer labels, not {labels.dtype}.")
        key = jax.random.fold_in(jax.random.fold_in(
            jax.random.wrap_key_data(state.rng), state.step), _NEGATIVE_STREAM)
        wrong = (labels + jax.random.randint(key, labels.shape, 1, self.num_classes)
                 ) % self.num_classes
        (loss, aux), grads = jax.value_and_grad(
            lambda p: self.loss(task, p, state, x, labels, wrong), has_aux=True)(state.params)
        return grads, (loss, aux)

    def predict(self, task, state, inputs):
        return getattr(self, f"_predict_by_{self.prediction}")(task, state, inputs)

    def _predict_by_classifier(self, task, state, inputs):
        """The classifier's logits on the input with the neutral label."""
        neutral = jnp.full((len(inputs), self.num_classes), self.neutral_label)
        return task.eval_forward(state, self.embed(inputs, neutral))[0]

    def _predict_by_goodness(self, task, state, inputs):
        """Per label, the goodness of every layer but the first on the input with it."""
        return jnp.stack([
            sum(jnp.sum(jnp.square(a), axis=-1) for a in task.eval_forward(
                state, self.embed(inputs, jax.nn.one_hot(
                    jnp.full(len(inputs), label), self.num_classes)))[1][1:])
            for label in range(self.num_classes)], axis=-1)


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
    "gradient": Procedure, "weight_mirror": WeightMirror, "pepita": Pepita,
    "forward_forward": ForwardForward}


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
