"""The errors of the experiment harness (config, data, workdir): each names the config
field, file or directory and the fix.

The command line (:mod:`bioflax.experiment.main`) prints any
:class:`bioflax.errors.BioflaxError` as one line, with the flag that fixes it, and exits
non-zero, without a traceback; everything else is a bug and keeps its traceback.
"""

from bioflax.errors import BioflaxError


class ConfigError(BioflaxError, ValueError):
    """A config field holds a value that bioflax cannot use."""

    def __init__(self, field: str, value, allowed: str):
        shown = value.to_dict() if hasattr(value, "to_dict") else value  # a sub-config
        super().__init__(f"config field {field} = {shown!r} is invalid: {allowed}.")
        self.field, self.value = field, value


class ConfigFileError(BioflaxError, OSError):
    """The config file named on the command line cannot be loaded."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"the config file {path} cannot be loaded: {reason}. Pass "
                         "--config=PATH of an existing config file, or the name of a shipped "
                         "one, e.g. --config=kp_mnist.py (bioflax/experiment/configs/).")
        self.path = path


class WorkdirError(BioflaxError, OSError):
    """The workdir cannot be created or is not a directory."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"the workdir {path} {reason}. Choose a directory that you can "
                         "write to (a new one, or the workdir of a run to resume).")
        self.path = path


class DataNotFoundError(BioflaxError, RuntimeError):
    """A data set could not be found, downloaded or read."""


class WorkdirLockedError(BioflaxError, RuntimeError):
    """Another live run is using the same workdir."""
