"""The training batch's targets, visible to code traced inside the model's forward pass.

The trainer's training step calls the model inside :func:`visible`, so a rule that needs
the targets (DRTP projects the one-hot class label) reads them with :func:`current`; a
hand-written training step wraps its forward pass the same way.
"""

import contextlib
import threading

_state = threading.local()


@contextlib.contextmanager
def visible(values):
    """Makes ``values`` (the batch's targets) what :func:`current` returns in the block."""
    previous = current()
    _state.values = values
    try:
        yield
    finally:
        _state.values = previous


def current():
    """The targets of the innermost :func:`visible` block; None outside any."""
    return getattr(_state, "values", None)
