"""bioflax: learning rules without weight transport, as Flax layers, with a trainer."""

from bioflax.layers import (
    RandomDenseLinearDFAHidden,
    RandomDenseLinearDFAOutput,
    RandomDenseLinearFA,
    RandomDenseLinearInterpolateFABP,
    RandomDenseLinearKP,
    exact_backprop,
)
from bioflax.models import BioNeuralNetwork, TeacherNetwork

__all__ = [
    "BioNeuralNetwork",
    "RandomDenseLinearDFAHidden",
    "RandomDenseLinearDFAOutput",
    "RandomDenseLinearFA",
    "RandomDenseLinearInterpolateFABP",
    "RandomDenseLinearKP",
    "TeacherNetwork",
    "exact_backprop",
]
