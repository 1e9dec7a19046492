"""What a person sees of a run: a progress bar on a terminal, one line per epoch, and the
throughput in TensorBoard. Every scalar also goes to the metric writer."""

import logging
import sys
import time
from typing import Callable, Mapping, Optional

from bioflax.trainer.callback import Callback

logger = logging.getLogger(__name__)

Summary = Callable[[Mapping[str, float]], dict[str, str]]


def epoch_line(epoch: int, max_epochs: int, logs: Mapping[str, float],
               summary: Optional[Summary] = None) -> str:
    """``epoch 3/20  train/loss 0.1234  val/loss 0.0987  val/accuracy 0.9712 ...``: the
    training loss, every validation metric (seeds averaged) and ``summary(logs)``."""
    shown = {name: f"{value:.4g}" for name, value in logs.items()
             if name == "train/loss" or name.startswith("val/")}
    shown.update(summary(logs) if summary else {})
    return "  ".join([f"epoch {epoch + 1}/{max_epochs}",
                      *(f"{name} {value}" for name, value in shown.items())])


class Console(Callback):
    """A tqdm bar when ``bar`` (default: stderr is a terminal), and one line per epoch:
    written above the bar, else logged at INFO."""

    def __init__(self, bar: Optional[bool] = None, summary: Optional[Summary] = None):
        self.show_bar = sys.stderr.isatty() if bar is None else bar
        self.summary = summary
        self._bar = None

    def on_fit_start(self, trainer, state) -> None:
        if self.show_bar:
            import tqdm  # pylint: disable=import-outside-toplevel
            self._bar = tqdm.tqdm(total=trainer.durations.total_steps, initial=int(state.step),
                                  unit="step", dynamic_ncols=True)

    def on_train_chunk_end(self, trainer, state, step, logs) -> None:
        if self._bar is not None:
            epoch = (step - 1) // trainer.durations.steps_per_epoch
            self._bar.set_description(f"epoch {epoch + 1}")
            self._bar.set_postfix(loss=f"{logs.get('train/loss', float('nan')):.4f}")
            self._bar.update(step - self._bar.n)

    def on_epoch_end(self, trainer, state, epoch, logs) -> None:
        line = epoch_line(epoch, trainer.max_epochs, logs, self.summary)
        if self._bar is not None:
            self._bar.write(line)
        else:
            logger.info(line)

    def on_fit_end(self, trainer, state) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def on_exception(self, trainer, error) -> None:
        self.on_fit_end(trainer, None)


class LoggingWriter:
    """A metric writer that logs every scalar at DEBUG: the trainer's default without a
    workdir (clu's writers import TensorFlow)."""

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        logger.debug("step %d: %s", step,
                     "  ".join(f"{name} {value:.6g}" for name, value in scalars.items()))

    def flush(self) -> None:
        pass


class ReportProgress(Callback):
    """``steps_per_sec`` written to the trainer's metric writer, and the time left logged,
    at most every ``every_secs`` seconds (as ``clu.periodic_actions.ReportProgress``)."""

    def __init__(self, every_secs: float = 30.0):
        self.every_secs = every_secs
        self._last: Optional[tuple[float, int]] = None

    def on_fit_start(self, trainer, state) -> None:
        self._last = (time.monotonic(), int(state.step))

    def on_train_chunk_end(self, trainer, state, step, logs) -> None:
        now = time.monotonic()
        since, first = self._last
        if now - since < self.every_secs or step <= first:
            return
        rate = (step - first) / (now - since)
        self._last = (now, step)
        trainer.writer.write_scalars(step, {"steps_per_sec": rate})
        left = (trainer.durations.total_steps - step) / rate
        logger.info("step %d/%d, %.1f steps/s, %.0f min left", step,
                    trainer.durations.total_steps, rate, left / 60)
