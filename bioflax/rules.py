"""The learning rules, each written once, for any linear map ``y = f(x, W)`` (Dense, Conv,
DenseGeneral, Einsum, a tied embedding's ``attend``).

A rule keeps the forward pass ``f(x, W)`` and the layer's own parameter gradient
``dW = VJP of f(x, ·) at δ``; it changes the signal sent to the layer below to the
input-gradient of the *same* map with a backward kernel ``B`` of ``W``'s shape in place of
``W``, ``VJP of f(·, B) at δ`` (``δ Bᵀ`` for a Dense layer, the transposed convolution
with ``B`` for a Conv layer):

=====================  =============================================  ==================
rule                   backward kernel ``B``                          gradient of ``B``
=====================  =============================================  ==================
``bp``                 ``W``                                          (no ``B``)
``fa``                 fixed random ``B``                             0
``kp``                 ``B``, a parameter (``feedback_kernel``)       ``dW``
``interpolate_fa_bp``  ``λB + (1−λ)W``, ``B`` fixed (λ=1 FA, 0 BP)    0
``usf``                ``c · sign(W)``, ``c = 1/√fan_in``             (no ``B``)
``frsf``               ``|M| ⊙ sign(W)``, ``M`` fixed random          0
``brsf``               ``|M| ⊙ sign(W)``, ``M`` redrawn every step    (no ``B``)
=====================  =============================================  ==================

``fan_in`` is the number of inputs of one output unit, the size of the kernel axes the map
contracts with its input (``in`` for Dense, kernel height × width × input channels per
group for Conv, the ``axis`` dimensions of a DenseGeneral, the kernel axes an Einsum shares
with its input and not with its output); the caller of :meth:`Rule.linear` passes it
(:func:`fan_in` of the kernel's shape when it does not), so ``c`` is the standard deviation of
LeCun-normal initialisation; a positive constant per layer scales the updates below it
and does not change their direction. ``M`` is drawn with the layer's ``feedback_init``;
brSF draws it from the RNG stream ``'feedback'`` (pass ``rngs={'feedback': key}`` to
``apply``; a trainer derives it from seed and step, so runs are reproducible).

DFA (``dfa``) is not a backward kernel: it is wired by :mod:`bioflax.converter` through the
whole model (see there). Fixed matrices live in the ``'feedback'`` variable collection
(no optimizer or weight decay reaches them); KP's ``B`` is the parameter
``feedback_kernel`` beside ``kernel``.

:func:`exact_backprop` switches every rule to true backprop at trace time, on the same
variables; the alignment metrics use it for their reference.
"""

import abc
import contextlib
import dataclasses
import functools
import math
import threading
from typing import Any, Callable, ClassVar, Optional, Protocol

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.core import scope as flax_scope

from bioflax import targets

FEEDBACK_COLLECTION = "feedback"
FEEDBACK_KERNEL = "feedback_kernel"
FEEDBACK_MAGNITUDE = "feedback_magnitude"
FEEDBACK_RNG = "feedback"

Initializer = Callable[..., jax.Array]
Linear = Callable[[jax.Array, jax.Array], jax.Array]
default_kernel_init = nn.initializers.lecun_normal()

_backprop_override = threading.local()


@contextlib.contextmanager
def exact_backprop():
    """Makes every rule traced inside the block compute true gradients.

    The switch acts at trace time: use it inside the function that ``jax.jit`` compiles
    (as the trainer's alignment metric does), not around a call of an already compiled one.
    """
    previous = getattr(_backprop_override, "active", False)
    _backprop_override.active = True
    try:
        yield
    finally:
        _backprop_override.active = previous


def backprop_is_forced() -> bool:
    return getattr(_backprop_override, "active", False)


# --- the one custom VJP every kernel-replacing rule uses ---------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 4))
def feedback_linear(linear: Linear, x, kernel, backward_kernel, learn_feedback: bool):
    """``linear(x, kernel)``; its VJP sends ``VJP of linear(·, backward_kernel)`` at ``δ``
    to ``x``, gives ``kernel`` its usual ``dW`` and ``backward_kernel`` ``dW`` when
    ``learn_feedback`` (Kolen-Pollack), else zero."""
    del backward_kernel, learn_feedback
    return linear(x, kernel)


def _feedback_linear_fwd(linear, x, kernel, backward_kernel, learn_feedback):
    del learn_feedback
    return linear(x, kernel), (x, kernel, backward_kernel)


def _feedback_linear_bwd(linear, learn_feedback, residuals, delta):
    x, kernel, backward_kernel = residuals
    (d_x,) = jax.vjp(lambda h: linear(h, backward_kernel), x)[1](delta)
    (d_kernel,) = jax.vjp(lambda w: linear(x, w), kernel)[1](delta)
    d_backward = d_kernel if learn_feedback else jnp.zeros_like(backward_kernel)
    return d_x, d_kernel, d_backward


feedback_linear.defvjp(_feedback_linear_fwd, _feedback_linear_bwd)


# --- the rules -----------------------------------------------------------------------------


def fan_in(kernel_shape) -> int:
    """Inputs per output unit of a Dense or Conv kernel: every axis of the kernel but the
    last (output) one. Kernels of other layouts need their contracted axes counted by the
    caller (``fan_in=`` of :meth:`Rule.linear`)."""
    return math.prod(kernel_shape[:-1])


_kernel_fan_in = fan_in  # for the methods whose argument ``fan_in`` shadows it


class Store(Protocol):
    """Where a layer's rule keeps its variables and draws its randomness: a Linen scope
    (:class:`LinenStore`) or an NNX layer (:class:`bioflax.nnx.NnxStore`). Each method
    returns the variable ``name``, creating it with ``init(key, shape, dtype)`` when the
    layer is being initialised."""

    def fixed(self, name: str, init: Initializer, shape, dtype) -> jax.Array:
        """A fixed feedback variable, which no optimizer updates."""

    def param(self, name: str, init: Initializer, shape, dtype) -> jax.Array:
        """A trained parameter beside the layer's kernel."""

    def rng(self, stream: str) -> jax.Array:
        """A new key of the RNG stream ``stream``; ValueError naming how to supply it."""


@dataclasses.dataclass(frozen=True)
class LinenStore:
    """A :class:`Store` on a Linen scope: fixed variables in the ``'feedback'`` collection,
    parameters in ``'params'``, keys from the ``apply`` call's ``rngs``."""

    scope: flax_scope.Scope

    def fixed(self, name, init, shape, dtype):
        return self.scope.variable(FEEDBACK_COLLECTION, name,
                                   lambda: init(self.scope.make_rng("params"), shape, dtype)
                                   ).value

    def param(self, name, init, shape, dtype):
        return self.scope.param(name, init, shape, dtype)

    def rng(self, stream):
        if not (self.scope.has_rng(stream) or self.scope.is_mutable_collection("params")):
            raise ValueError(
                f"This rule draws a new feedback matrix at every step from the {stream!r} "
                f"RNG stream: call apply(..., rngs={{{stream!r}: key}}) with a new key per "
                "step.")
        return self.scope.make_rng(stream)  # at init without it: from 'params'


class Rule(abc.ABC):
    """How one linear layer trains: ``linear(store, f, x, kernel, param_dtype, fan_in)``
    returns ``f(x, kernel)`` with the rule's backward pass. ``store`` (a :class:`Store`)
    is where the rule keeps the layer's feedback variables (of ``param_dtype``);
    ``fan_in`` is the number of inputs of one output unit of ``f`` (``None``:
    :func:`fan_in` of the kernel's shape, right for Dense and Conv kernels)."""

    name: ClassVar[str]

    @abc.abstractmethod
    def linear(self, store: Store, f: Linear, x, kernel, param_dtype,
               fan_in: Optional[int] = None) -> jax.Array:
        ...


@dataclasses.dataclass(frozen=True)
class Backprop(Rule):
    """Plain backprop: the layer below receives ``VJP of f(·, W)``."""

    name: ClassVar[str] = "bp"

    def linear(self, store, f, x, kernel, param_dtype, fan_in=None):
        del store, param_dtype, fan_in
        return f(x, kernel)


@dataclasses.dataclass(frozen=True)
class KernelReplacingRule(Rule):
    """A rule whose backward pass is that of ``f(·, B)``, ``B`` from :meth:`backward_kernel`."""

    feedback_init: Initializer = default_kernel_init
    learns_feedback: ClassVar[bool] = False

    @abc.abstractmethod
    def backward_kernel(self, store: Store, kernel: jax.Array, param_dtype,
                        fan_in: int) -> jax.Array:
        """The backward kernel ``B`` (creating its variables at ``init``)."""

    def linear(self, store, f, x, kernel, param_dtype, fan_in=None):
        if fan_in is None:
            fan_in = _kernel_fan_in(kernel.shape)
        backward = self.backward_kernel(store, kernel, param_dtype, int(fan_in))
        if backprop_is_forced():
            return f(x, kernel)
        return feedback_linear(f, x, kernel, backward.astype(kernel.dtype),
                               self.learns_feedback)


@dataclasses.dataclass(frozen=True)
class FeedbackAlignment(KernelReplacingRule):
    """Lillicrap et al. 2016: a fixed random ``B``."""

    name: ClassVar[str] = "fa"

    def backward_kernel(self, store, kernel, param_dtype, fan_in):
        return store.fixed(FEEDBACK_KERNEL, self.feedback_init, kernel.shape, param_dtype)


@dataclasses.dataclass(frozen=True)
class KolenPollack(KernelReplacingRule):
    """Kolen & Pollack 1994: ``B`` is a parameter that receives ``W``'s update.

    Train with weight decay applied before the update
    (``optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr))``): then ``W − B``
    shrinks by ``(1 − lr·wd)`` every SGD step and ``B`` converges to ``W``.
    """

    name: ClassVar[str] = "kp"
    learns_feedback: ClassVar[bool] = True

    def backward_kernel(self, store, kernel, param_dtype, fan_in):
        return store.param(FEEDBACK_KERNEL, self.feedback_init, kernel.shape, param_dtype)


@dataclasses.dataclass(frozen=True)
class InterpolateFABP(KernelReplacingRule):
    """``B_λ = λB + (1−λ)W`` with a fixed random ``B``: λ = 1 is FA, λ = 0 is backprop."""

    name: ClassVar[str] = "interpolate_fa_bp"
    interpolation_factor: float = 0.5

    def __post_init__(self):
        if not 0.0 <= self.interpolation_factor <= 1.0:
            raise ValueError(
                f"interpolation_factor must lie in [0, 1] (1 = FA, 0 = BP), "
                f"got {self.interpolation_factor}.")

    def backward_kernel(self, store, kernel, param_dtype, fan_in):
        fixed = store.fixed(FEEDBACK_KERNEL, self.feedback_init, kernel.shape, param_dtype)
        lam = float(self.interpolation_factor)
        return fixed if lam == 1.0 else lam * fixed + (1.0 - lam) * kernel


@dataclasses.dataclass(frozen=True)
class UniformSignSymmetry(KernelReplacingRule):
    """uSF (Liao, Leibo & Poggio 2016): ``B = sign(W) / √fan_in``, from the current ``W``."""

    name: ClassVar[str] = "usf"

    def backward_kernel(self, store, kernel, param_dtype, fan_in):
        del store, param_dtype
        return jnp.sign(kernel) / math.sqrt(fan_in)


@dataclasses.dataclass(frozen=True)
class FixedRandomSignSymmetry(KernelReplacingRule):
    """frSF: ``B = |M| ⊙ sign(W)`` with ``M`` drawn once (stored as ``feedback_magnitude``)
    and the current ``sign(W)``."""

    name: ClassVar[str] = "frsf"

    def backward_kernel(self, store, kernel, param_dtype, fan_in):
        magnitude = store.fixed(FEEDBACK_MAGNITUDE, self.feedback_init, kernel.shape,
                                param_dtype)
        return jnp.abs(magnitude) * jnp.sign(kernel)


@dataclasses.dataclass(frozen=True)
class BatchRandomSignSymmetry(KernelReplacingRule):
    """brSF: ``B = |M| ⊙ sign(W)`` with ``M`` redrawn at every call from the ``'feedback'``
    RNG stream (at ``init`` without that stream, from ``'params'``)."""

    name: ClassVar[str] = "brsf"

    def backward_kernel(self, store, kernel, param_dtype, fan_in):
        magnitude = self.feedback_init(store.rng(FEEDBACK_RNG), kernel.shape, param_dtype)
        return jnp.abs(magnitude) * jnp.sign(kernel)


# The ways DFA's ``B`` at a Conv layer's input may be shaped (the converter's
# ``bioflax.converter.DFA_CONV_FEEDBACK`` builds them).
DFA_CONV_FEEDBACK_KINDS = ("dense", "shared_kernel")
# How DFA's ``B`` at an input treats the positions the output lacks (a ViT's tokens, for a
# classifier's ``(batch, n)`` output): an entry of ``B`` per position ('independent') or
# one ``B`` of the features, shared by every position ('shared').
DFA_POSITION_FEEDBACK_KINDS = ("independent", "shared")
# What DFA's matrices project, from the output error ``e``: ``e`` itself (Nøkland 2016) or
# its sign (sDFA, Frenkel, Lefebvre & Bol 2021).
DFA_SIGNALS: dict[str, Callable[[jax.Array], jax.Array]] = {"error": lambda e: e,
                                                            "sign": jnp.sign}

@dataclasses.dataclass(frozen=True)
class DirectFeedbackAlignment(Rule):
    """Nøkland 2016, through any graph (wired by :func:`bioflax.convert`).

    The layer itself computes and differentiates as backprop does; the converter reads its
    input through ``stop_gradient`` and sends the output error ``e`` to that input through
    a fixed random ``B`` drawn with ``feedback_init``: ``e Bᵀ`` with ``B`` of shape
    ``(size of the input, n_outputs)`` (token-wise, ``(features of the input, n_outputs)``
    at every position, for a ``(batch, ..., n_outputs)`` output), or at a Conv layer with
    ``conv_feedback='shared_kernel'`` the transposed convolution with a kernel ``B`` of
    ``e`` repeated over the output map (:data:`bioflax.converter.DFA_CONV_FEEDBACK`).
    ``position_feedback='shared'`` gives an input with positions the output lacks (a
    ViT's tokens under a classifier, a Conv input's rows and columns) one ``B`` of shape
    ``(size of the axes the layer contracts, n_outputs)`` for all of them: every position
    receives ``e Bᵀ``, as Launay et al.'s TinyDFA repeats its projection (with
    ``conv_feedback='shared_kernel'``, a Conv input takes that instead).
    ``signal='sign'`` projects ``sign(e)`` instead (sDFA).
    """

    name: ClassVar[str] = "dfa"
    feedback_init: Initializer = default_kernel_init
    conv_feedback: str = "dense"
    position_feedback: str = "independent"
    signal: str = "error"

    def __post_init__(self):
        if self.conv_feedback not in DFA_CONV_FEEDBACK_KINDS:
            raise ValueError(f"Unknown conv_feedback {self.conv_feedback!r}; choose one of "
                             f"{list(DFA_CONV_FEEDBACK_KINDS)}.")
        if self.position_feedback not in DFA_POSITION_FEEDBACK_KINDS:
            raise ValueError(f"Unknown position_feedback {self.position_feedback!r}; choose "
                             f"one of {list(DFA_POSITION_FEEDBACK_KINDS)}.")
        if self.signal not in DFA_SIGNALS:
            raise ValueError(f"Unknown signal {self.signal!r}; choose one of "
                             f"{list(DFA_SIGNALS)}.")

    def linear(self, store, f, x, kernel, param_dtype, fan_in=None):
        del store, param_dtype, fan_in
        return f(x, kernel)

    def source(self, output: jax.Array) -> Optional[jax.Array]:
        """What the projection needs beyond the error, read at the forward pass (DRTP's
        target); None."""
        del output
        return None

    def projected(self, error: jax.Array, source: Optional[jax.Array]) -> jax.Array:
        """What the matrices ``B_l`` project, from the output error (at the backward pass)."""
        del source
        return DFA_SIGNALS[self.signal](error)


@dataclasses.dataclass(frozen=True)
class DirectRandomTargetProjection(DirectFeedbackAlignment):
    """DRTP (Frenkel, Lefebvre & Bol 2021): DFA's wiring with the one-hot target ``y*``
    projected in place of the error, ``δ_l = φ'(a_l) ⊙ (y* B_lᵀ)``, summed over the batch
    as the reference code does; the output layer keeps its true gradient. The targets are
    class labels, read with :func:`bioflax.targets.current` (the trainer's step makes them
    visible)."""

    name: ClassVar[str] = "drtp"

    def __post_init__(self):
        super().__post_init__()
        if self.signal != "error":
            raise ValueError("DRTP projects the target, so it takes no signal option.")

    def source(self, output):
        labels = targets.current()
        if labels is None:
            return None
        if not jnp.issubdtype(labels.dtype, jnp.integer) or labels.shape != output.shape[:-1]:
            raise ValueError(
                f"DRTP projects the one-hot class label: its targets must be integer labels "
                f"of shape {output.shape[:-1]} (the model's output {output.shape} without its "
                f"last axis); got {labels.dtype} of shape {labels.shape}. For a regression "
                "target use 'dfa'.")
        return jax.nn.one_hot(labels, output.shape[-1], dtype=output.dtype)

    def projected(self, error, source):
        if source is None:
            raise ValueError("DRTP projects the target: differentiate the model inside "
                             "`with bioflax.targets.visible(labels):` (the Trainer does).")
        return source


RULES: dict[str, type[Rule]] = {
    rule.name: rule for rule in (
        Backprop, FeedbackAlignment, KolenPollack, InterpolateFABP, UniformSignSymmetry,
        FixedRandomSignSymmetry, BatchRandomSignSymmetry, DirectFeedbackAlignment,
        DirectRandomTargetProjection)
}


def get_rule(name: str, **options: Any) -> Rule:
    """The rule ``name`` of :data:`RULES` with its options (``feedback_init``,
    ``interpolation_factor``, ``conv_feedback``, ``position_feedback``, ``signal``); an
    unknown name or option raises a ``ValueError``."""
    try:
        rule_class = RULES[name]
    except KeyError:
        raise ValueError(f"Unknown rule {name!r}; choose one of {list(RULES)}.") from None
    allowed = {field.name for field in dataclasses.fields(rule_class)}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"Rule {name!r} takes the options {sorted(allowed) or 'none'}; "
                         f"got {unknown}.")
    return rule_class(**options)
