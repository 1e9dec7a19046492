"""One run per workdir: its layout, an advisory lock that the kernel drops when its process
dies, and the file that marks a finished run."""

import contextlib
import fcntl
import os
import re
import socket
from typing import Optional

from bioflax.experiment.errors import WorkdirError, WorkdirLockedError

LOCK_FILE = ".lock"
RESULT_FILE = "result.json"  # written last, by a run that finished
CHECKPOINTS_DIR = "checkpoints"  # the Orbax checkpoints
PLOTS_DIR = "plots"  # the run's figures
LOGS_DIR = "logs"  # each process's output, under bioflax.launch


def seed_dir(seed: int) -> str:
    """The name of seed ``seed``'s workdir inside a sweep's directory of one config."""
    return f"seed_{seed}"


def seed_of(name: str) -> Optional[int]:
    """The seed of a workdir named by :func:`seed_dir`; None for any other name."""
    match = re.fullmatch(r"seed_(\d+)", name)
    return int(match.group(1)) if match else None


def make(workdir: str) -> None:
    """Creates ``workdir`` (and its parents) unless it exists; WorkdirError if it cannot."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise WorkdirError(workdir, "is an existing file, not a directory")
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise WorkdirError(workdir, f"cannot be created ({e.strerror})") from e


@contextlib.contextmanager
def exclusive(workdir: str):
    """Holds ``workdir/.lock`` for the block; raises WorkdirLockedError if a live run holds it.

    ``flock`` locks belong to the open file, so a run killed with ``kill -9`` leaves no
    stale lock behind: the file stays, the lock does not.
    """
    make(workdir)
    path = os.path.join(workdir, LOCK_FILE)
    with open(path, "a+", encoding="utf-8") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise WorkdirLockedError(
                f"{workdir} is in use by a run that is still going ({holder}). Wait for it to "
                "finish or stop it, or give this run its own --workdir.") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        lock.flush()
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
