"""What a person sees of a run, written to a stream (stdout): a progress bar on a terminal,
one line per epoch, and progress lines inside long epochs when no bar is shown; and the
throughput in TensorBoard. Every scalar also goes to the metric writer."""

import logging
import sys
import time
from typing import Mapping, Optional, TextIO

from bioflax.trainer.callback import Callback

logger = logging.getLogger(__name__)


def epoch_line(epoch: int, epochs: int, logs: Mapping[str, float]) -> str:
    """``epoch 3/20  train/loss 0.1234  val/loss 0.0987  val/accuracy 0.9712  hidden angle
    41.2°``: the training loss, every validation metric (seeds averaged) and, when the
    alignment metric ran, the mean angle of the hidden layers' updates to backprop's."""
    shown = [f"{name} {value:.4g}" for name, value in logs.items()
             if name == "train/loss" or name.startswith("val/")]
    angle = logs.get("alignment/hidden_grad_angle")
    shown += [] if angle is None else [f"hidden angle {angle:.1f}°"]
    return "  ".join([f"epoch {epoch + 1}/{epochs}", *shown])


def progress_line(step: int, total_steps: int, steps_per_sec: float) -> str:
    """``step 600/6000  17.2 steps/s  5 min left``."""
    return (f"step {step}/{total_steps}  {steps_per_sec:.1f} steps/s  "
            f"{_duration((total_steps - step) / steps_per_sec)} left")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class _Rate:
    """Steps per second since the last reading, read at most every ``every_secs``."""

    def __init__(self, every_secs: float, step: int):
        self.every_secs = every_secs
        self.restart(step)

    def restart(self, step: int) -> None:
        self._since, self._step = time.monotonic(), step

    def read(self, step: int) -> Optional[float]:
        """The rate since the last reading (or restart), or None before ``every_secs``."""
        now = time.monotonic()
        if now - self._since < self.every_secs or step <= self._step:
            return None
        rate = (step - self._step) / max(now - self._since, 1e-9)
        self._since, self._step = now, step
        return rate


class Console(Callback):
    """What a person reads of ``fit``, written to ``stream`` (default: ``sys.stdout`` when
    ``fit`` starts), each line flushed: one line per epoch; a live bar when ``bar``
    (default: when ``stream`` is a terminal; ``tqdm.auto``'s, a widget in a notebook with
    ipywidgets), else, inside an epoch, a :func:`progress_line` when ``every_secs`` have
    passed since the last line."""

    def __init__(self, bar: Optional[bool] = None, *, stream: Optional[TextIO] = None,
                 every_secs: float = 30.0):
        self.bar = bar
        self.stream = stream
        self.every_secs = every_secs
        self._out: Optional[TextIO] = None
        self._rate: Optional[_Rate] = None
        self._bar = None

    def on_fit_start(self, trainer, state) -> None:
        self._out = self.stream if self.stream is not None else sys.stdout
        self._rate = _Rate(self.every_secs, int(state.step))
        isatty = getattr(self._out, "isatty", None)
        if self.bar if self.bar is not None else bool(isatty and isatty()):
            from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
            self._bar = tqdm(total=trainer.durations.total_steps, initial=int(state.step),
                             unit="step", dynamic_ncols=True, file=self._out)

    def on_train_chunk_end(self, trainer, state, step, logs) -> None:
        if self._bar is not None:
            epoch = (step - 1) // trainer.durations.steps_per_epoch
            self._bar.set_description(f"epoch {epoch + 1}")
            self._bar.set_postfix(loss=f"{logs.get('train/loss', float('nan')):.4f}")
            self._bar.update(step - self._bar.n)
        elif not trainer.durations.ends_epoch(step):  # else the epoch line follows
            rate = self._rate.read(step)
            if rate is not None:
                self._write(progress_line(step, trainer.durations.total_steps, rate))

    def on_train_epoch_end(self, trainer, state, epoch, logs) -> None:
        self._write(epoch_line(epoch, trainer.durations.epochs, logs))
        self._rate.restart(int(state.step))

    def _write(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line, file=self._out)
        else:
            print(line, file=self._out, flush=True)

    def on_fit_end(self, trainer, state) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def on_exception(self, trainer, error) -> None:
        self.on_fit_end(trainer, None)


class LoggingWriter:
    """A metric writer that logs every scalar at DEBUG: the trainer's default without a
    workdir (clu's writers import TensorFlow); the hyper-parameters and the names of
    images too, for use beside clu's writers in an ``AsyncMultiWriter``."""

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        logger.debug("step %d: %s", step,
                     "  ".join(f"{name} {value:.6g}" for name, value in scalars.items()))

    def write_hparams(self, hparams: Mapping[str, object]) -> None:
        logger.debug("hyper-parameters: %s",
                     "  ".join(f"{name} {value}" for name, value in hparams.items()))

    def write_images(self, step: int, images: Mapping[str, object]) -> None:
        logger.debug("step %d: images %s", step, ", ".join(images))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class ReportProgress(Callback):
    """``steps_per_sec`` written to the trainer's metric writer at most every ``every_secs``
    seconds (as ``clu.periodic_actions.ReportProgress``); the :class:`Console` prints the
    progress a person reads."""

    def __init__(self, every_secs: float = 30.0):
        self.every_secs = every_secs
        self._rate: Optional[_Rate] = None

    def on_fit_start(self, trainer, state) -> None:
        self._rate = _Rate(self.every_secs, int(state.step))

    def on_train_chunk_end(self, trainer, state, step, logs) -> None:
        rate = self._rate.read(step)
        if rate is not None:
            trainer.writer.write_scalars(step, {"steps_per_sec": rate})
