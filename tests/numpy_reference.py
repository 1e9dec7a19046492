"""A float64 NumPy reference MLP, written from the equations of docs/convert.md ("What
changes, per layer"): the forward pass storing ``x_l`` and ``a_l``, one backward
pass per rule with hand-written derivatives of the activations and of the losses, and the
cosine and angle between gradients. Tests compare the code under test with it; JAX's
autodiff never computes a reference here.
"""

import numpy as np


def _sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


# name -> (φ, φ'), derivatives written by hand.
NP_ACTIVATIONS = {
    "tanh": (np.tanh, lambda a: 1.0 - np.tanh(a) ** 2),
    "sigmoid": (_sigmoid, lambda a: _sigmoid(a) * (1.0 - _sigmoid(a))),
    "relu": (lambda a: np.maximum(a, 0.0), lambda a: (a > 0).astype(np.float64)),
    "identity": (lambda a: a, lambda a: np.ones_like(a)),
}


def np_forward(x, kernels, biases, activations):
    """``a_l = x_l W_l + b_l``; ``x_{l+1} = φ_l(a_l)`` for hidden layers, output linear.

    Returns the list of layer inputs ``xs`` (``xs[l]`` is the input of layer ``l``) and the
    list of pre-activations ``pre`` (``pre[-1]`` is the network output).
    """
    xs, pre = [x], []
    for index, (kernel, bias) in enumerate(zip(kernels, biases)):
        a = xs[-1] @ kernel + bias
        pre.append(a)
        if index < len(activations):
            xs.append(NP_ACTIVATIONS[activations[index]][0](a))
    return xs, pre


def np_mse(y, t):
    """``L = Σ (y − t)² / (2N)``; returns ``(L, e = ∂L/∂y = (y − t)/N)``."""
    n = y.shape[0]
    return 0.5 * np.sum((y - t) ** 2) / n, (y - t) / n


def np_softmax_xent(y, t):
    """``L = −Σ t log softmax(y) / N``; returns ``(L, e = (softmax(y) − t)/N)``."""
    n = y.shape[0]
    z = y - y.max(axis=-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)
    return -np.sum(t * np.log(p)) / n, (p - t) / n


NP_LOSSES = {"mse": np_mse, "xent": np_softmax_xent}


def np_backward_chain(rules, xs, pre, kernels, feedbacks, activations, error, lambdas=None):
    """Backward pass of a chain of BP / FA / KP / interpolation layers.

    ``rules[l]`` is the rule of layer ``l`` (``"bp"``, ``"fa"``, ``"kp"``, ``"interp"``),
    ``lambdas[l]`` the interpolation factor λ of an ``"interp"`` layer. Layer ``l`` sends
    ``δ_l M_lᵀ`` down with ``M = W`` (BP), ``B`` (FA, KP), ``λB + (1−λ)W`` (interp);
    ``δ_{l−1} = φ'(a_{l−1}) ⊙ (that signal)``; ``dW = xᵀδ``, ``db = Σδ``; ``dB = dW`` for
    KP and ``0`` for FA / interp (``None`` for BP: no ``B``).

    Returns ``(dWs, dbs, dBs, dx)``.
    """
    depth = len(kernels)
    d_kernels, d_biases, d_feedbacks = [None] * depth, [None] * depth, [None] * depth
    delta = error
    signal = None
    for index in reversed(range(depth)):
        rule = rules[index]
        d_kernels[index] = xs[index].T @ delta
        d_biases[index] = delta.sum(axis=0)
        if rule == "bp":
            backward = kernels[index]
        elif rule in ("fa", "kp"):
            backward = feedbacks[index]
            d_feedbacks[index] = d_kernels[index] if rule == "kp" else np.zeros_like(
                feedbacks[index])
        elif rule == "interp":
            lam = lambdas[index]
            backward = lam * feedbacks[index] + (1.0 - lam) * kernels[index]
            d_feedbacks[index] = np.zeros_like(feedbacks[index])
        else:
            raise AssertionError(rule)
        signal = delta @ backward.T
        if index > 0:
            delta = NP_ACTIVATIONS[activations[index - 1]][1](pre[index - 1]) * signal
    return d_kernels, d_biases, d_feedbacks, signal


def np_backward_dfa(xs, pre, kernels, feedbacks, activations, error):
    """DFA: ``δ_L = e``; hidden ``δ_l = φ'(a_l) ⊙ (e B_lᵀ)``; every ``dB = 0``.

    The input cotangent is the first layer's ``δ_0`` sent back through ``W_0`` (``δ_0
    W_0ᵀ``), as backprop would send it.
    """
    depth = len(xs)
    d_kernels, d_biases, d_feedbacks = [None] * depth, [None] * depth, [None] * depth
    for index in range(depth):
        if index == depth - 1:
            delta = error
        else:
            delta = NP_ACTIVATIONS[activations[index]][1](pre[index]) * (
                error @ feedbacks[index].T)
            d_feedbacks[index] = np.zeros_like(feedbacks[index])
        d_kernels[index] = xs[index].T @ delta
        d_biases[index] = delta.sum(axis=0)
    first = error if depth == 1 else NP_ACTIVATIONS[activations[0]][1](pre[0]) * (
        error @ feedbacks[0].T)
    return d_kernels, d_biases, d_feedbacks, first @ kernels[0].T


def np_reference(rule, x, kernels, biases, feedbacks, activations, targets, loss,
                 lambdas=None):
    """Loss value and all gradients of a network whose every layer follows ``rule``.

    ``rule`` is a single name or a per-layer list (mixed chain networks).
    """
    xs, pre = np_forward(x, kernels, biases, activations)
    value, error = NP_LOSSES[loss](pre[-1], targets)
    if rule == "dfa":
        grads = np_backward_dfa(xs, pre, kernels, feedbacks, activations, error)
    else:
        rules = [rule] * len(kernels) if isinstance(rule, str) else list(rule)
        grads = np_backward_chain(rules, xs, pre, kernels, feedbacks, activations, error,
                                  lambdas)
    return value, pre[-1], grads


def np_mean_squared_error(y, t):
    """``L = mean over batch and outputs of (y − t)²``; returns ``(L, e = 2 (y − t) / size)``."""
    return np.mean((y - t) ** 2), 2.0 * (y - t) / y.size


def np_gradients(params, feedback, x, t, activations, rule, lam=None):
    """Per-layer ``(dW, db)`` of :func:`np_mean_squared_error` under ``rule``, every layer
    alike.

    ``params[l]`` = (W_l, b_l); ``feedback[l]`` = B_l (or None). ``rule`` is 'bp', 'fa',
    'kp', 'interp' (signal δ (λB + (1−λ)W)ᵀ, λ = ``lam``) or 'dfa' (δ_l = φ'(a_l) ⊙ (e B_lᵀ)).
    """
    f64 = lambda a: None if a is None else np.asarray(a, np.float64)  # noqa: E731
    kernels = [f64(w) for w, _ in params]
    biases = [f64(b) for _, b in params]
    feedback = [f64(b) for b in feedback]
    xs, pre = np_forward(f64(x), kernels, biases, activations)
    _, error = np_mean_squared_error(pre[-1], f64(t))
    if rule == "dfa":
        d_kernels, d_biases, _, _ = np_backward_dfa(xs, pre, kernels, feedback, activations,
                                                    error)
    else:
        d_kernels, d_biases, _, _ = np_backward_chain(
            [rule] * len(params), xs, pre, kernels, feedback, activations, error,
            [lam] * len(params))
    return list(zip(d_kernels, d_biases))


def np_cosine(a, b):
    """The cosine of the angle between ``a`` and ``b``, flattened."""
    a, b = np.ravel(a), np.ravel(b)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def np_angle(a, b):
    """The angle between ``a`` and ``b``, flattened, in degrees."""
    return float(np.degrees(np.arccos(np.clip(np_cosine(a, b), -1.0, 1.0))))
