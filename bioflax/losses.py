"""Per-example training losses, chosen by name from :data:`LOSSES`."""

import jax
import jax.numpy as jnp
import optax


def _check_labels(logits, labels):
    """ValueError unless ``labels`` are integers shaped as ``logits`` without its last axis."""
    if labels.shape != logits.shape[:-1] or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(
            f"a classification loss takes integer labels of shape {logits.shape[:-1]} for "
            f"outputs of shape {logits.shape}, not {labels.dtype} labels of shape "
            f"{labels.shape}: pass class indices (not one-hot rows), one per output row.")


def softmax_cross_entropy(logits, labels):
    """Per-example ``−log softmax(logits)[label]``."""
    _check_labels(logits, labels)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def sigmoid_cross_entropy(logits, labels):
    """Per-example ``Σ_j BCE(σ(z_j), onehot_j)``: one sigmoid output per class, as in
    Akrout et al. 2019 and Nøkland 2016; its gradient is ``σ(z) − onehot``."""
    _check_labels(logits, labels)
    targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    return optax.sigmoid_binary_cross_entropy(logits, targets).sum(axis=-1)


def sigmoid_mean_cross_entropy(logits, labels):
    """Per-example ``mean_j BCE(σ(z_j), onehot_j)``: PyTorch's ``binary_cross_entropy``
    averaged over the classes, as in Frenkel et al.'s DRTP code."""
    return sigmoid_cross_entropy(logits, labels) / logits.shape[-1]


def sigmoid_squared_error(logits, labels):
    """Per-example ``½ ‖σ(z) − onehot‖²``: sigmoid outputs and squared error, as in
    Lillicrap et al. 2016."""
    _check_labels(logits, labels)
    targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    return 0.5 * jnp.sum(jnp.square(jax.nn.sigmoid(logits) - targets), axis=-1)


def mean_squared_error(predictions, targets):
    """Per-example ``mean_j (y_j − t_j)²``; the targets have the predictions' shape."""
    if targets.shape != predictions.shape:
        raise ValueError(
            f"mean_squared_error: targets of shape {targets.shape} for predictions of shape "
            f"{predictions.shape} would broadcast; reshape the targets to "
            f"{predictions.shape} (e.g. y[:, None] for one output per example).")
    return jnp.mean(jnp.square(predictions - targets), axis=-1)


def token_cross_entropy(logits, labels):
    """Per-example mean over positions of ``−log softmax(logits[t])[label[t]]``: logits
    ``(batch, T, vocab)``, integer labels ``(batch, T)``, loss ``(batch,)``. Every example
    has the same T, so the batch mean is the mean over all tokens."""
    _check_labels(logits, labels)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(axis=-1)


# The losses each kind of problem can train with, by name.
LOSSES = {
    "classification": {"softmax_cross_entropy": softmax_cross_entropy,
                       "sigmoid_cross_entropy": sigmoid_cross_entropy,
                       "sigmoid_mean_cross_entropy": sigmoid_mean_cross_entropy,
                       "sigmoid_squared_error": sigmoid_squared_error},
    "regression": {"mean_squared_error": mean_squared_error},
    # Next-token prediction on sequences: outputs (batch, T, vocab), targets (batch, T).
    "language_modeling": {"softmax_cross_entropy": token_cross_entropy},
}

# The loss each kind of problem trains with when none is named.
DEFAULT_LOSS = {"classification": "softmax_cross_entropy", "regression": "mean_squared_error",
                "language_modeling": "softmax_cross_entropy"}


def loss_for(problem: str, name: str | None = None):
    """The per-example loss ``name`` of ``LOSSES[problem]``, or ``DEFAULT_LOSS[problem]``
    when None; KeyError for a name the problem cannot train with."""
    return LOSSES[problem][DEFAULT_LOSS[problem] if name is None else name]
