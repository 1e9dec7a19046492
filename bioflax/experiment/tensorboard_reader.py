"""Reading back what a run wrote: scalar curves from its TensorBoard event files."""

import numpy as np
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util


def read_scalars(workdir: str) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` for every scalar in ``workdir``'s event files.

    clu writes scalars as TF2 summary tensors; both those and classic scalars are read.
    Steps are sorted; a step written twice (a resumed run) keeps its last value.
    """
    accumulator = event_accumulator.EventAccumulator(
        workdir, size_guidance={event_accumulator.TENSORS: 0, event_accumulator.SCALARS: 0})
    accumulator.Reload()
    tags = accumulator.Tags()
    curves: dict[str, dict[int, float]] = {}
    for tag in tags.get("tensors", []):
        for event in accumulator.Tensors(tag):
            value = tensor_util.make_ndarray(event.tensor_proto)
            if value.ndim == 0 and np.issubdtype(value.dtype, np.number):
                curves.setdefault(tag, {})[event.step] = float(value)
    for tag in tags.get("scalars", []):
        for event in accumulator.Scalars(tag):
            curves.setdefault(tag, {})[event.step] = float(event.value)
    return {tag: sorted(points.items()) for tag, points in curves.items()}
