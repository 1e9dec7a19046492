"""The errors a user of the library can cause and fix: each message names the problem,
the Python parameter and the fix. Everything else is a bug."""


class BioflaxError(Exception):
    """Base of the errors caused by input (a parameter, data, a checkpoint, and the
    experiment harness's config and workdir), not by bioflax."""


class TrainingDivergedError(BioflaxError, RuntimeError):
    """The loss or the parameters stopped being finite at ``step`` (``value``: the loss)."""

    def __init__(self, step: int, value):
        super().__init__(f"Training diverged at step {step}: the loss is {value}. Nothing "
                         "from this step on was saved; the latest checkpoint is from before "
                         "it. Lower the learning rate or the initial weight scale.")
        self.step, self.value = step, value


class CheckpointError(BioflaxError, RuntimeError):
    """The checkpoints in a directory cannot be used for this run."""


class TrainingInterrupted(BioflaxError):
    """SIGINT or SIGTERM stopped training after a checkpoint was written."""

    def __init__(self, signal_name: str, step: int):
        super().__init__(f"{signal_name} stopped training at step {step}.")
        self.signal_name, self.step = signal_name, step


class DistributedError(BioflaxError, RuntimeError):
    """The processes of a multi-process run cannot be joined (environment, launcher)."""
