"""Trains and evaluates a bioflax experiment: ``python main.py --config=CONFIG --workdir=DIR``."""

import logging

from absl import app, flags
from ml_collections import config_flags

from bioflax import train

config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints and TensorBoard logs.")
flags.mark_flags_as_required(["config", "workdir"])


class _DropLibraryChatter(logging.Filter):
    """Orbax logs every file of every save at INFO; keep its warnings and errors."""

    def filter(self, record):
        return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_DropLibraryChatter())
    train.train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
