"""The metric collections of a task (clu), and helpers for metrics computed inside the
compiled step.

No ``from __future__ import annotations`` here: clu collections read their field types.
"""

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp
import flax
import numpy as np
from clu import metrics as clu_metrics


@flax.struct.dataclass
class ClassificationMetrics(clu_metrics.Collection):
    """Loss and accuracy, from ``loss=`` per example, ``logits=`` and integer ``labels=``."""

    loss: clu_metrics.Average.from_output("loss")
    accuracy: clu_metrics.Accuracy


@flax.struct.dataclass
class RegressionMetrics(clu_metrics.Collection):
    """The loss, from ``loss=`` per example."""

    loss: clu_metrics.Average.from_output("loss")


@flax.struct.dataclass
class TokenAccuracy(clu_metrics.Average):
    """The fraction of positions whose argmax is the label, from ``logits=`` ``(batch, T,
    vocab)`` and integer ``labels=`` ``(batch, T)``; ``mask=`` ``(batch,)`` drops whole
    examples (the padding of an evaluation batch). Every example has T positions, so the
    mean over examples of their per-position accuracy is the accuracy over tokens."""

    @classmethod
    def from_model_output(cls, *, logits, labels, mask=None, **_):
        correct = (logits.argmax(axis=-1) == labels).astype(jnp.float32)
        return super().from_model_output(values=correct.mean(axis=-1), mask=mask)


@flax.struct.dataclass
class LanguageModelingMetrics(clu_metrics.Collection):
    """Loss (mean next-token cross-entropy, from ``loss=`` per example) and token
    accuracy, for sequence outputs ``(batch, T, vocab)`` and labels ``(batch, T)``."""

    loss: clu_metrics.Average.from_output("loss")
    accuracy: TokenAccuracy


# The metric collection of each kind of problem.
COLLECTIONS = {"classification": ClassificationMetrics, "regression": RegressionMetrics,
               "language_modeling": LanguageModelingMetrics}


def averages(values: Mapping[str, jax.Array], weight) -> dict[str, clu_metrics.Average]:
    """Each scalar as a clu ``Average`` counted ``weight`` (0 or 1) times."""
    return {name: clu_metrics.Average(total=jnp.asarray(value, jnp.float32) * weight,
                                      count=jnp.asarray(weight, jnp.int32))
            for name, value in values.items()}


def merge_averages(a: dict[str, clu_metrics.Average], b: dict[str, clu_metrics.Average]):
    return {name: a[name].merge(b[name]) for name in a}


def compute_collection(collection: clu_metrics.Collection) -> dict[str, np.ndarray]:
    """Each metric's value; unlike ``Collection.compute`` it accepts a leading seed axis."""
    return {field.name: np.asarray(getattr(collection, field.name).compute())
            for field in dataclasses.fields(collection) if not field.name.startswith("_")}


def compute_averages(metrics: Mapping[str, clu_metrics.Average]) -> dict[str, np.ndarray]:
    """The averages that were counted at least once (per seed, when stacked)."""
    return {name: np.asarray(m.total) / np.asarray(m.count)
            for name, m in metrics.items() if np.all(np.asarray(m.count) > 0)}
