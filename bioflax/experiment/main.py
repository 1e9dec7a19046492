"""The experiment command line: ``bioflax-train --config=CONFIG --workdir=DIR`` (or
``python main.py ...`` in a checkout). ``CONFIG`` is a config file's path; a path that does
not exist is looked up among the configs shipped in :mod:`bioflax.experiment.configs`
(``--config=kp_mnist.py``, ``--config=configs/paper/akrout2019.py:kp``)."""

import logging
import os
import re
import sys
import traceback
from typing import Optional

# Before TensorFlow loads (through tensorflow_datasets and clu): no oneDNN or TPU-probe notices.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _import_tensorflow_quietly() -> None:
    """Imports TensorFlow with the process's stderr (fd 2) on /dev/null: its C++ start-up
    notices (oneDNN, CPU features) are written there before any logging is set up, whatever
    TF_CPP_MIN_LOG_LEVEL says. A failing import
    still raises its Python exception."""
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


_import_tensorflow_quietly()

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from bioflax import distributed
from bioflax.errors import (BioflaxError, CheckpointError, TrainingDivergedError,
                            TrainingInterrupted)
from bioflax.experiment import configs
from bioflax.experiment.errors import ConfigError, ConfigFileError, WorkdirError
from bioflax.experiment import run as run_lib

config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints and TensorBoard logs.")
flags.DEFINE_enum("log_format", "plain", ["plain", "absl"],
                  "plain: each log line is its message (warnings and errors start with "
                  "'warning: ' and 'error: '); absl: absl's prefix of level, time, thread and "
                  "source line.")
flags.mark_flags_as_required(["config", "workdir"])


class _PlainFormatter(logging.Formatter):
    """The message alone; from WARNING up it starts with the level (``warning: ...``)."""

    def format(self, record):
        text = super().format(record)
        return (f"{record.levelname.lower()}: {text}" if record.levelno >= logging.WARNING
                else text)


def configure_logging(log_format: str) -> None:
    """Log records below WARNING shown only from bioflax's loggers (``--verbosity``: INFO,
    or DEBUG at 1); every other library (JAX, XLA, Orbax, TFDS, TensorBoard, clu, asyncio)
    from WARNING up, unless ``--logger_levels`` names it. ``log_format`` 'plain' drops
    absl's prefix of the lines. The epoch and progress lines are not log records: the
    trainer's :class:`~bioflax.trainer.Console` prints them to stdout."""
    verbosity = logging.root.level  # what absl made of --verbosity
    ours = logging.getLogger("bioflax")
    if ours.level == logging.NOTSET:  # not set by --logger_levels
        ours.setLevel(verbosity)
    logging.root.setLevel(max(verbosity, logging.WARNING))
    if log_format == "plain":
        absl_logging.get_absl_handler().setFormatter(_PlainFormatter())


def _fail(message: str, exit_code: int, *, every_process: bool = False):
    """Prints ``error: message`` and exits; in a multi-process run without waiting for the
    other processes, unless the failure is known to reach ``every_process`` at once."""
    print(f"error: {message}", file=sys.stderr)
    if not every_process:
        distributed.exit_alone(exit_code)
    sys.exit(exit_code)


def parse_flags(argv):
    """absl's flag parsing, with one line instead of a traceback for unknown config fields."""
    argv = with_shipped_configs(argv)
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        _fail(setting_error(error) or f"{error}\nPass --helpfull to see the flags.", 2)
    except OSError as error:  # an override of a config whose file could not be loaded
        argument = next((value for flag, value in zip(argv, argv[1:]) if flag == "--config"),
                        next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")),
                             ""))
        _fail(str(config_file_error(argument, error)), 2)
    except (AttributeError, KeyError) as error:
        missing = re.findall(r"'([^']+)'", str(error))
        overrides = [a.split("=", 1)[0] for a in argv if a.startswith("--config.")]
        named = [o for o in overrides if missing and o.endswith(f".{missing[-1]}")] or overrides
        _fail(f"{', '.join(named)}: the config has no such field ({error}). The fields and "
              "their meaning are listed in bioflax/experiment/configs/default.py.", 2)


def setting_error(error: flags.Error) -> Optional[str]:
    """One line for a config file whose ``get_config`` refused the ``:SETTING`` of
    ``--config=FILE:SETTING`` (its own message, or: it takes none); None for other errors."""
    message = str(error)
    if "Error whilst parsing config file" not in message:
        return None
    argument = message.split("flag --config=", 1)[-1].split(":", 2)
    spec = ":".join(argument[:2])
    last = message.strip().splitlines()[-1]
    if re.search(r"get_config\(\) takes 0 positional arguments", last):
        return (f"--config={spec}: {argument[0]} takes no setting; drop "
                f"':{argument[1]}'.")
    return f"--config={spec}: {last.split(': ', 1)[-1]}"


def with_shipped_configs(argv: list[str]) -> list[str]:
    """``argv`` with its ``--config`` value found among the shipped configs when it names
    no file here (:func:`bioflax.experiment.configs.resolve`)."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg.startswith("--config="):
            out[i] = "--config=" + configs.resolve(arg.split("=", 1)[1])
        elif arg == "--config" and i + 1 < len(out):
            out[i + 1] = configs.resolve(out[i + 1])
    return out


def config_file_error(argument: str, error: OSError) -> ConfigFileError:
    """What went wrong loading the --config file ``argument`` (``PATH[:ARG]``), in one line."""
    path = argument.split(":", 1)[0]
    reason = ("there is no such file" if not os.path.exists(path) else
              "it is a directory" if os.path.isdir(path) else
              str(error.__cause__ or error).splitlines()[0])
    return ConfigFileError(path, reason)


def loaded_config():
    """The --config flag's config; ConfigFileError when its file could not be loaded (the
    config flag defers that error to the first use of the config)."""
    config = flags.FLAGS.config
    try:
        config.get("seed")
    except OSError as error:
        raise config_file_error(config_flags.get_config_filename(flags.FLAGS["config"]),
                                error) from error
    return config


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    configure_logging(flags.FLAGS.log_format)
    try:
        run_lib.train_and_evaluate(loaded_config(), flags.FLAGS.workdir)
    except (ConfigError, ConfigFileError, WorkdirError) as error:
        _fail(str(error), 2)
    except TrainingInterrupted as interrupted:
        _fail(f"{interrupted.signal_name} stopped training at step {interrupted.step}; the "
              "state of that step is checkpointed. Run the same command again to resume.",
              130 if interrupted.signal_name == "SIGINT" else 143, every_process=True)
    except TrainingDivergedError as error:
        _fail(f"{error} (--config.optimizer.learning_rate, --config.model.kernel_init_scale); "
              "running again resumes from the latest checkpoint.", 1)
    except CheckpointError as error:
        _fail(f"{error} (--workdir)", 1)
    except BioflaxError as error:
        _fail(str(error), 1)
    except Exception:  # a bug: it keeps its traceback; a multi-process run stops at once
        if distributed.joined():
            traceback.print_exc()
            distributed.exit_alone(1)
        raise


def run():
    """The ``bioflax-train`` console script."""
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
