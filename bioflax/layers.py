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
DFA hidden (Nøkland)     ``e`` unchanged; own ``δ = φ'(a) ⊙ (e Bᵀ)``   0
DFA output               ``e`` unchanged; own ``δ = e``     (no B)
=======================  =================================  ==============

:class:`RuleDense` takes any rule of :mod:`bioflax.rules` (the sign-symmetry family too);
FA, KP and the interpolation are its named forms. Fixed feedback matrices live in the
``'feedback'`` variable collection, so no optimizer (and no weight decay) can move them;
Kolen-Pollack's ``B`` is a parameter named ``feedback_kernel`` in ``'params'`` and
receives ``W``'s gradient.

The DFA layers here form a chain: a custom VJP must return a cotangent of its input's
shape, so a DFA layer sends the output error ``e`` down in the first
``final_output_dim`` columns of its input cotangent (zeros after them). Hence every DFA
hidden layer must be at least ``final_output_dim`` wide, and DFA layers must feed each
other directly: an operation between them would alter the error they pass down. For DFA
through any model, use ``bioflax.convert(model, 'dfa')``.

:func:`exact_backprop` switches every layer to true backprop at trace time, on the same
variables; the alignment metrics use it to compute the backprop reference.
"""

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from bioflax import rules
from bioflax.rules import (  # noqa: F401  (re-exported: the layers' public vocabulary)
    FEEDBACK_COLLECTION,
    FEEDBACK_KERNEL,
    Initializer,
    backprop_is_forced,
    default_kernel_init,
    exact_backprop,
)


def _param_grads(x, delta):
    """``dW = xᵀ δ`` and ``db = Σ δ`` over every leading (batch) axis."""
    batch_axes = tuple(range(x.ndim - 1))
    return jnp.tensordot(x, delta, axes=(batch_axes, batch_axes)), delta.sum(batch_axes)


def _fit_last_axis(error, width):
    """The output error placed in the first columns of a ``width``-wide cotangent."""
    size = error.shape[-1]
    if size >= width:
        return error[..., :width]
    return jnp.pad(error, [(0, 0)] * (error.ndim - 1) + [(0, width - size)])


def _matmul(x, kernel):
    return x @ kernel


# --- DFA ---------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def dfa_hidden_dense(x, kernel, bias, feedback, activation):
    """``φ(x @ kernel + bias)``; backward: ``δ = φ'(a) ⊙ (e Bᵀ)``, ``e`` passed down."""
    del feedback
    return activation(x @ kernel + bias)


def _dfa_hidden_fwd(x, kernel, bias, feedback, activation):
    pre_activation = x @ kernel + bias
    return activation(pre_activation), (x, pre_activation, feedback)


def _dfa_hidden_bwd(activation, residuals, carried):
    x, pre_activation, feedback = residuals
    error = carried[..., : feedback.shape[-1]]
    _, activation_vjp = jax.vjp(activation, pre_activation)
    (delta,) = activation_vjp(error @ feedback.T)
    d_kernel, d_bias = _param_grads(x, delta)
    return _fit_last_axis(error, x.shape[-1]), d_kernel, d_bias, jnp.zeros_like(feedback)


dfa_hidden_dense.defvjp(_dfa_hidden_fwd, _dfa_hidden_bwd)


@jax.custom_vjp
def dfa_output_dense(x, kernel, bias):
    """``x @ kernel + bias``; backward: ``δ = e`` and ``e`` is passed down unchanged."""
    return x @ kernel + bias


def _dfa_output_fwd(x, kernel, bias):
    return x @ kernel + bias, x


def _dfa_output_bwd(x, error):
    d_kernel, d_bias = _param_grads(x, error)
    return _fit_last_axis(error, x.shape[-1]), d_kernel, d_bias


dfa_output_dense.defvjp(_dfa_output_fwd, _dfa_output_bwd)


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

    def _fixed_feedback(self, shape):
        """A feedback matrix in the ``'feedback'`` collection: never trained, never decayed."""
        return self.variable(FEEDBACK_COLLECTION, FEEDBACK_KERNEL,
                             lambda: self.feedback_init(self.make_rng("params"), shape,
                                                        self.param_dtype)).value


class _RuleDenseBase(_FeedbackDenseBase):
    """``x W + b`` trained by the rule :meth:`rule` returns."""

    def _rule(self) -> rules.Rule:
        raise NotImplementedError

    @nn.compact
    def __call__(self, x):
        kernel, bias = self._kernel_and_bias(x)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return self._rule().linear(self.scope, _matmul, x, kernel, self.param_dtype) + bias


class RuleDense(_RuleDenseBase):
    """A Dense layer trained by ``rule``, any :class:`bioflax.rules.Rule` but DFA (whose
    error reaches a layer through the whole model: use ``bioflax.convert``)."""

    rule: rules.Rule = rules.Backprop()

    def _rule(self):
        if isinstance(self.rule, rules.DirectFeedbackAlignment):
            raise ValueError("RuleDense cannot train by DFA on its own: use "
                             "bioflax.convert(model, 'dfa') or the RandomDenseLinearDFA* chain.")
        return self.rule


class RandomDenseLinearFA(_RuleDenseBase):
    """Feedback Alignment: the layer below receives ``δ Bᵀ`` with a fixed random ``B``."""

    def _rule(self):
        return rules.FeedbackAlignment(self.feedback_init)


class RandomDenseLinearKP(_RuleDenseBase):
    """Kolen-Pollack: like FA, but ``B`` is a parameter that receives ``W``'s gradient.

    Train it with weight decay on both, applied before the update
    (``optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr))``): then
    ``W − B`` shrinks by ``(1 − lr·wd)`` every SGD step and ``B`` converges to ``W``.
    """

    def _rule(self):
        return rules.KolenPollack(self.feedback_init)


class RandomDenseLinearInterpolateFABP(_RuleDenseBase):
    """Sends ``δ (λB + (1−λ)W)ᵀ`` down: ``λ = 1`` is FA, ``λ = 0`` is backprop."""

    interpolation_factor: float = 0.5

    def _rule(self):
        return rules.InterpolateFABP(self.feedback_init, self.interpolation_factor)


class RandomDenseLinearDFAHidden(_FeedbackDenseBase):
    """A DFA hidden layer, activation included: ``h = φ(x W + b)``.

    Its own ``δ = φ'(a) ⊙ (e Bᵀ)`` with a fixed ``B`` of shape ``(features,
    final_output_dim)``; it passes the output error ``e`` on to the layer below. Its input
    must come straight from the layer below (another DFA hidden layer or the data) and its
    output go straight into a DFA layer: see the module docstring.
    """

    final_output_dim: int = 0
    activation: Callable[[jax.Array], jax.Array] = nn.relu

    @nn.compact
    def __call__(self, x):
        if self.final_output_dim <= 0:
            raise ValueError("RandomDenseLinearDFAHidden needs final_output_dim, the number "
                             f"of network outputs; got {self.final_output_dim}.")
        if self.features < self.final_output_dim:
            raise ValueError(
                f"RandomDenseLinearDFAHidden has {self.features} features but the network "
                f"has {self.final_output_dim} outputs: a DFA hidden layer passes the output "
                "error down through its own width, so it needs features >= final_output_dim.")
        kernel, bias = self._kernel_and_bias(x)
        feedback = self._fixed_feedback((self.features, self.final_output_dim))
        x, kernel, bias, feedback = nn.dtypes.promote_dtype(x, kernel, bias, feedback,
                                                            dtype=self.dtype)
        if backprop_is_forced():
            return self.activation(x @ kernel + bias)
        return dfa_hidden_dense(x, kernel, bias, feedback, self.activation)


class RandomDenseLinearDFAOutput(_FeedbackDenseBase):
    """The output layer of a DFA network: trained by ``e`` and passing ``e`` down."""

    @nn.compact
    def __call__(self, x):
        kernel, bias = self._kernel_and_bias(x)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        if backprop_is_forced():
            return x @ kernel + bias
        return dfa_output_dense(x, kernel, bias)
