"""bioflax: learning rules without weight transport, as Flax layers, with a trainer.

One import site: ``from bioflax import convert, Task, Trainer, ArrayData, ...`` reaches the
converter, the layers, the procedures and everything a training program needs.
"""

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
from bioflax import alignment, losses, procedures, rules, targets
from bioflax.alignment import Alignment
from bioflax.procedures import ForwardForward, Pepita, WeightMirror
from bioflax.trainer import (ArrayData, Callback, ClassificationMetrics, EarlyStopping,
                             LanguageModelingMetrics, LearningRateMonitor, ModelCheckpoint,
                             OptimizerFactory, RegressionMetrics, Task, Trainer, TrainState)
from bioflax.trainer.task import Procedure

__all__ = [
    "Alignment",
    "ArrayData",
    "BioNeuralNetwork",
    "Callback",
    "ClassificationMetrics",
    "EarlyStopping",
    "ForwardForward",
    "LanguageModelingMetrics",
    "LearningRateMonitor",
    "ModelCheckpoint",
    "OptimizerFactory",
    "Pepita",
    "Procedure",
    "RegressionMetrics",
    "Task",
    "TrainState",
    "Trainer",
    "WeightMirror",
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
    "alignment",
    "exact_backprop",
    "losses",
    "procedures",
    "rules",
    "targets",
]
