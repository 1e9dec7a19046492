"""The errors a user can cause and fix: each message names the problem and the fix.

The command line (:mod:`bioflax.experiment.main`) prints any :class:`BioflaxError` as one
line, with the flag that fixes it, and exits non-zero, without a traceback; everything else
is a bug and keeps its traceback.
"""


class BioflaxError(Exception):
    """Base of the errors caused by input (config, data, workdir), not by bioflax."""


class ConfigError(BioflaxError, ValueError):
    """A config field holds a value that bioflax cannot use."""

    def __init__(self, field: str, value, allowed: str):
        super().__init__(f"config field {field} = {value!r} is invalid: {allowed}.")
        self.field, self.value = field, value


class ConfigFileError(BioflaxError, OSError):
    """The config file named on the command line cannot be loaded."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"the config file {path} cannot be loaded: {reason}. Pass "
                         "--config=PATH of an existing config file, e.g. "
                         "--config=configs/kp_mnist.py (the configs are in configs/).")
        self.path = path


class WorkdirError(BioflaxError, OSError):
    """The workdir cannot be created or is not a directory."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"the workdir {path} {reason}. Choose a directory that you can "
                         "write to (a new one, or the workdir of a run to resume).")
        self.path = path


class DataNotFoundError(BioflaxError, RuntimeError):
    """A data set could not be found, downloaded or read."""


class TrainingDivergedError(BioflaxError, RuntimeError):
    """The loss or the parameters stopped being finite at ``step`` (``value``: the loss)."""

    def __init__(self, step: int, value):
        super().__init__(f"Training diverged at step {step}: the loss is {value}. Nothing "
                         "from this step on was saved; the latest checkpoint is from before "
                         "it. Lower the learning rate or the initial weight scale.")
        self.step, self.value = step, value


class CheckpointError(BioflaxError, RuntimeError):
    """The workdir's checkpoints cannot be used for this run."""


class WorkdirLockedError(BioflaxError, RuntimeError):
    """Another live run is using the same workdir."""


class TrainingInterrupted(BioflaxError):
    """SIGINT or SIGTERM stopped training after a checkpoint was written."""

    def __init__(self, signal_name: str, step: int):
        super().__init__(f"{signal_name} stopped training at step {step}.")
        self.signal_name, self.step = signal_name, step


class DistributedError(BioflaxError, RuntimeError):
    """The processes of a multi-process run cannot be joined (environment, launcher)."""
