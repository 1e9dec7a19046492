"""Dense layers whose backward pass implements a feedback learning rule.

Flax convention: a layer computes ``a = h @ W + b`` with ``W`` of shape ``(in, out)``.
Every layer here has the forward pass of ``nn.Dense``; only the backward pass differs.
With ``δ = ∂L/∂a`` of a layer and ``e = ∂L/∂a_L`` the error at the output layer, the
parameter gradients are always ``dW = hᵀ δ`` and ``db = Σ_batch δ``; the rules differ in
the signal sent to the layer below and in what the feedback matrix ``B`` receives:

=======================  =================================  ==============
rule                     signal to the layer below          gradient of B
=======================  =================================  ==============
FA (Lillicrap 2016)      ``δ Bᵀ``, ``B`` fixed              0
KP (Kolen-Pollack 1994)  ``δ Bᵀ``                           ``dW``
FA↔BP interpolation      ``δ (λB + (1−λ)W)ᵀ``               0
DFA hidden (Nøkland)     none; own ``δ = φ'(a) ⊙ (e Bᵀ)``   0
DFA output               none; own ``δ = e``                (no B)
=======================  =================================  ==============

:class:`RuleDense` takes any rule of :mod:`bioflax.rules` or its name (the sign-symmetry
family and DFA too); FA, KP, the interpolation and the DFA layers are its named forms.
Fixed feedback matrices live in the ``'feedback'`` variable collection, so no optimizer
(and no weight decay) can move them; Kolen-Pollack's ``B`` is a parameter named
``feedback_kernel`` in ``'params'`` and receives ``W``'s gradient.

DFA is ``bioflax.convert``'s mechanism (:func:`bioflax.converter.with_error_projection`):
each DFA hidden layer hands the next layer ``stop_gradient`` of its output, and the
output layer's output passes through an identity whose VJP sends ``e Bᵀ`` to every DFA
hidden layer of the same ``apply``. So DFA layers need no particular width and any
operation may stand between them; for DFA through any model, use
``bioflax.convert(model, 'dfa')``.

:func:`exact_backprop` switches every layer to true backprop at trace time, on the same
variables; the alignment metrics use it to compute the backprop reference.
"""

import dataclasses
import weakref
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
from flax import linen as nn

from bioflax import converter, rules
from bioflax.rules import (  # noqa: F401  (re-exported: the layers' public vocabulary)
    FEEDBACK_COLLECTION,
    FEEDBACK_KERNEL,
    Initializer,
    backprop_is_forced,
    default_kernel_init,
    exact_backprop,
)


def _matmul(x, kernel):
    return x @ kernel


# --- Flax modules ------------------------------------------------------------------------


class _FeedbackDenseBase(nn.Module):
    """Shared fields and parameters of the feedback layers (those of ``nn.Dense``)."""

    features: int
    _: dataclasses.KW_ONLY
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = nn.initializers.zeros_init()
    feedback_init: Initializer = default_kernel_init

    def _kernel_and_bias(self, x):
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features),
                            self.param_dtype)
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        else:
            bias = jnp.zeros((self.features,), self.param_dtype)
        return kernel, bias

    def _fixed_feedback(self, shape, init: Initializer):
        """A feedback matrix in the ``'feedback'`` collection: never trained, never decayed."""
        return self.variable(FEEDBACK_COLLECTION, FEEDBACK_KERNEL,
                             lambda: init(self.make_rng("params"), shape,
                                          self.param_dtype)).value


# The DFA hidden layers of each ``apply`` (keyed by its root scope) waiting for the output
# layer: ``(h, B)`` per hidden layer, consumed by the output layer's error projection.
_DFA_PENDING: "weakref.WeakKeyDictionary[Any, list]" = weakref.WeakKeyDictionary()


def _resolve_rule(rule: Union[str, rules.Rule], feedback_init: Initializer) -> rules.Rule:
    """``rule`` as a :class:`bioflax.rules.Rule`; a name gets the layer's ``feedback_init``."""
    if not isinstance(rule, str):
        return rule
    takes_init = rule in rules.RULES and any(
        field.name == "feedback_init" for field in dataclasses.fields(rules.RULES[rule]))
    return rules.get_rule(rule, **({"feedback_init": feedback_init} if takes_init else {}))


def _project(h, matrix):
    return h @ matrix


class _RuleDenseBase(_FeedbackDenseBase):
    """``φ(x W + b)`` trained by the rule :meth:`_rule` returns (``φ`` the identity unless
    :meth:`_activation` names one).

    Under DFA (Nøkland 2016), by the mechanism of ``bioflax.convert(model, 'dfa')``: a
    hidden layer (:meth:`_final_output_dim` > 0) draws a fixed ``B`` of shape ``(features,
    final_output_dim)`` (``'feedback'``/``feedback_kernel``), registers its output ``h`` for
    this ``apply`` and hands the next layer ``stop_gradient(h)``; the output layer
    (``final_output_dim`` unset) passes its output through the converter's identity whose
    VJP sends ``e Bᵀ`` to each registered ``h``. So a hidden layer's ``δ = φ'(a) ⊙ (e
    Bᵀ)`` and the output layer's ``δ = e``, whatever lies between the layers.
    """

    def _rule(self) -> rules.Rule:
        raise NotImplementedError

    def _activation(self) -> Optional[Callable[[jax.Array], jax.Array]]:
        return None

    def _final_output_dim(self) -> int:
        return 0

    @nn.compact
    def __call__(self, x):
        rule = self._rule()
        activation = self._activation() or (lambda a: a)
        kernel, bias = self._kernel_and_bias(x)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        if not isinstance(rule, rules.DirectFeedbackAlignment):
            return activation(rule.linear(rules.LinenStore(self.scope), _matmul, x, kernel,
                                          self.param_dtype) + bias)
        output = activation(x @ kernel + bias)
        if self._final_output_dim() > 0:
            return self._dfa_hidden(output, rule)
        return self._dfa_output(output)

    def _dfa_hidden(self, h, rule):
        """Registers ``h`` and its ``B`` for this apply's output layer; ``stop_gradient(h)``."""
        feedback = self._fixed_feedback((self.features, self._final_output_dim()),
                                        rule.feedback_init)
        if backprop_is_forced():
            return h
        _DFA_PENDING.setdefault(self.scope.root, []).append((h, feedback))
        return jax.lax.stop_gradient(h)

    def _dfa_output(self, output):
        """``output``, whose VJP also sends ``e Bᵀ`` to every registered hidden ``h``."""
        pending = _DFA_PENDING.pop(self.scope.root, [])
        if backprop_is_forced() or not pending:
            return output
        for h, feedback in pending:
            if h.shape[:-1] != output.shape[:-1] or feedback.shape[-1] != output.shape[-1]:
                raise ValueError(
                    f"DFA: a hidden layer's output of shape {h.shape} with feedback "
                    f"{feedback.shape} cannot receive the error of this output of shape "
                    f"{output.shape}: the batch axes must match and final_output_dim must "
                    f"be {output.shape[-1]}.")
        return converter.with_error_projection(
            output, [h for h, _ in pending],
            [feedback.astype(h.dtype) for h, feedback in pending], [_project] * len(pending))


class RuleDense(_RuleDenseBase):
    """A Dense layer trained by ``rule``: a :class:`bioflax.rules.Rule` or a name of
    :data:`bioflax.rules.RULES` (``RuleDense(10, rule="usf")``; a name's rule gets the
    layer's ``feedback_init``).

    ``activation``, when given, is applied to ``x W + b`` inside the layer. Under
    ``'dfa'`` a hidden layer needs ``final_output_dim`` (the number of network outputs)
    and the network's last layer is a DFA ``RuleDense`` without it (see
    :class:`RandomDenseLinearDFAHidden`); other rules ignore ``final_output_dim``.
    """

    rule: Union[str, rules.Rule] = "bp"
    _: dataclasses.KW_ONLY
    activation: Optional[Callable[[jax.Array], jax.Array]] = None
    final_output_dim: int = 0

    def _rule(self):
        return _resolve_rule(self.rule, self.feedback_init)

    def _activation(self):
        return self.activation

    def _final_output_dim(self):
        return self.final_output_dim


class RandomDenseLinearFA(_RuleDenseBase):
    """Feedback Alignment: the layer below receives ``δ Bᵀ`` with a fixed random ``B``."""

    def _rule(self):
        return rules.FeedbackAlignment(self.feedback_init)


class RandomDenseLinearKP(_RuleDenseBase):
    """Kolen-Pollack: like FA, but ``B`` is a parameter that receives ``W``'s gradient
    (train it with weight decay as :class:`bioflax.rules.KolenPollack` says)."""

    def _rule(self):
        return rules.KolenPollack(self.feedback_init)


class RandomDenseLinearInterpolateFABP(_RuleDenseBase):
    """Sends ``δ (λB + (1−λ)W)ᵀ`` down: ``λ = 1`` is FA, ``λ = 0`` is backprop."""

    interpolation_factor: float = 0.5

    def _rule(self):
        return rules.InterpolateFABP(self.feedback_init, self.interpolation_factor)


class RandomDenseLinearDFAHidden(_RuleDenseBase):
    """A DFA hidden layer, activation included: ``h = φ(x W + b)``.

    Its ``δ = φ'(a) ⊙ (e Bᵀ)`` with a fixed ``B`` of shape ``(features,
    final_output_dim)``; it hands the next layer ``stop_gradient(h)``. The output layer of
    the same ``apply`` (:class:`RandomDenseLinearDFAOutput`) sends ``e Bᵀ`` to ``h``, so
    any operation may stand between the layers. ``RuleDense(features, rule='dfa',
    activation=φ, final_output_dim=n)`` is the same layer.
    """

    final_output_dim: int = 0
    activation: Callable[[jax.Array], jax.Array] = nn.relu

    def _rule(self):
        if self.final_output_dim <= 0:
            raise ValueError("RandomDenseLinearDFAHidden needs final_output_dim, the number "
                             f"of network outputs; got {self.final_output_dim}.")
        return rules.DirectFeedbackAlignment(self.feedback_init)

    def _activation(self):
        return self.activation

    def _final_output_dim(self):
        return self.final_output_dim


class RandomDenseLinearDFAOutput(_RuleDenseBase):
    """The output layer of a DFA network: ``δ = e``; its output's VJP sends ``e Bᵀ`` to
    every DFA hidden layer of the same ``apply``. ``RuleDense(features, rule='dfa')``."""

    def _rule(self):
        return rules.DirectFeedbackAlignment(self.feedback_init)
