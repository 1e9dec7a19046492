"""Per-example training losses, chosen by name from :data:`LOSSES`."""

import jax
import jax.numpy as jnp
import optax


def softmax_cross_entropy(logits, labels):
    """Per-example ``−log softmax(logits)[label]``."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def sigmoid_cross_entropy(logits, labels):
    """Per-example ``Σ_j BCE(σ(z_j), onehot_j)``: one sigmoid output per class, as in
    Akrout et al. 2019 and Nøkland 2016; its gradient is ``σ(z) − onehot``."""
    targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    return optax.sigmoid_binary_cross_entropy(logits, targets).sum(axis=-1)


def sigmoid_mean_cross_entropy(logits, labels):
    """Per-example ``mean_j BCE(σ(z_j), onehot_j)``: PyTorch's ``binary_cross_entropy``
    averaged over the classes, as in Frenkel et al.'s DRTP code."""
    return sigmoid_cross_entropy(logits, labels) / logits.shape[-1]


def sigmoid_squared_error(logits, labels):
    """Per-example ``½ ‖σ(z) − onehot‖²``: sigmoid outputs and squared error, as in
    Lillicrap et al. 2016."""
    targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    return 0.5 * jnp.sum(jnp.square(jax.nn.sigmoid(logits) - targets), axis=-1)


def mean_squared_error(predictions, targets):
    """Per-example ``mean_j (y_j − t_j)²``."""
    return jnp.mean(jnp.square(predictions - targets), axis=-1)


def token_cross_entropy(logits, labels):
    """Per-example mean over positions of ``−log softmax(logits[t])[label[t]]``: logits
    ``(batch, T, vocab)``, integer labels ``(batch, T)``, loss ``(batch,)``. Every example
    has the same T, so the batch mean is the mean over all tokens."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(axis=-1)


# The losses each kind of task can train with, by name.
LOSSES = {
    "classification": {"softmax_cross_entropy": softmax_cross_entropy,
                       "sigmoid_cross_entropy": sigmoid_cross_entropy,
                       "sigmoid_mean_cross_entropy": sigmoid_mean_cross_entropy,
                       "sigmoid_squared_error": sigmoid_squared_error},
    "regression": {"mean_squared_error": mean_squared_error},
    # Next-token prediction on sequences: outputs (batch, T, vocab), targets (batch, T).
    "language_modeling": {"softmax_cross_entropy": token_cross_entropy},
}

# The loss each kind of task trains with when none is named.
DEFAULT_LOSS = {"classification": "softmax_cross_entropy", "regression": "mean_squared_error",
                "language_modeling": "softmax_cross_entropy"}


def loss_for(task: str, name: str | None = None):
    """The per-example loss ``name`` of ``LOSSES[task]``, or ``DEFAULT_LOSS[task]`` when
    None; KeyError for a name the task cannot train with."""
    return LOSSES[task][DEFAULT_LOSS[task] if name is None else name]
