"""bioflax: learning rules without weight transport, as Flax layers, with a trainer."""

from bioflax.converter import Converted, convert
from bioflax.converter import summary as convert_summary
from bioflax.layers import (
    RandomDenseLinearDFAHidden,
    RandomDenseLinearDFAOutput,
    RandomDenseLinearFA,
    RandomDenseLinearInterpolateFABP,
    RandomDenseLinearKP,
    RuleDense,
    exact_backprop,
)
from bioflax.models import BioNeuralNetwork
from bioflax.nnx_converter import Feedback
from bioflax.zoo import ZOO

__all__ = [
    "BioNeuralNetwork",
    "Converted",
    "Feedback",
    "RandomDenseLinearDFAHidden",
    "RandomDenseLinearDFAOutput",
    "RandomDenseLinearFA",
    "RandomDenseLinearInterpolateFABP",
    "RandomDenseLinearKP",
    "RuleDense",
    "ZOO",
    "convert",
    "convert_summary",
    "exact_backprop",
]
