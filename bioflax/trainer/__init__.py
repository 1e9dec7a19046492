"""A generic trainer for Flax models: ``fit`` / ``evaluate`` / ``predict`` on a device mesh.

It knows nothing of feedback rules. A :class:`Task` says what to train (module, loss,
metrics, optimizer, optional in-step metrics such as alignment), a :class:`DataSource`
feeds it, the :class:`Trainer` says how (epochs, logging, callbacks, devices):

- ``task.py``: Task, TrainState, how the module is called (rngs, ``train``, mutable state);
  ``nnx_adapter.py``: a Flax NNX model behind a Linen module's ``init`` / ``apply``;
- ``arrays.py``: ArrayData, the epoch order, evaluation batches;
- ``data_sources.py``: the DataSource interface and the in-memory source;
- ``placement.py``: the mesh; ``programs.py``: the compiled chunk, evaluation and
  prediction programs; ``metrics.py``: the metric collections;
- ``loop.py``: the Trainer; ``callback.py``: the hooks; ``callbacks.py``: checkpoints,
  early stopping, the learning rate; ``console.py``: what is printed;
- ``durations.py``: epochs and steps, resolved in one place.
"""

from bioflax.errors import TrainingDivergedError, TrainingInterrupted
from bioflax.trainer.arrays import ArrayData
from bioflax.trainer.callback import Callback, CheckpointCallback
from bioflax.trainer.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from bioflax.trainer.console import Console, ReportProgress
from bioflax.trainer.data_sources import DataSource, InMemory
from bioflax.trainer.durations import Durations, resolve as resolve_durations
from bioflax.trainer.loop import FitResult, Trainer
from bioflax.trainer.metrics import (ClassificationMetrics, LanguageModelingMetrics,
                                     RegressionMetrics)
from bioflax.trainer.nnx_adapter import NnxAdapter
from bioflax.trainer.placement import make_mesh
from bioflax.trainer.task import OptimizerFactory, Task, TrainState

__all__ = [
    "ArrayData", "Callback", "CheckpointCallback", "ClassificationMetrics", "Console",
    "DataSource", "Durations", "EarlyStopping", "FitResult", "InMemory",
    "LanguageModelingMetrics", "LearningRateMonitor", "ModelCheckpoint", "NnxAdapter",
    "OptimizerFactory",
    "RegressionMetrics", "ReportProgress", "Task",
    "TrainState", "Trainer", "TrainingDivergedError", "TrainingInterrupted", "make_mesh",
    "resolve_durations",
]
