"""Joining the processes of a multi-process run, and the few things they must agree on.

A run on several processes (several hosts, or several processes on one machine) calls
:func:`initialize` before anything touches a device. It reads the environment:

* ``JAX_COORDINATOR_ADDRESS``: ``host:port`` of process 0, reachable from every process;
* ``JAX_NUM_PROCESSES``: how many processes take part;
* ``JAX_PROCESS_ID``: this process's id, ``0 .. JAX_NUM_PROCESSES - 1``.

With none of them set, ``jax.distributed.initialize`` detects them itself on SLURM, Open
MPI, Kubernetes and Cloud TPU. CPU devices talk through Gloo collectives.
"""

import logging
import os
import socket
import sys
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from bioflax.errors import DistributedError

COORDINATOR = "JAX_COORDINATOR_ADDRESS"
NUM_PROCESSES = "JAX_NUM_PROCESSES"
PROCESS_ID = "JAX_PROCESS_ID"
# A process that sends no heartbeat for this long is declared dead and the others stop,
# instead of waiting on it for JAX's default 100 s.
HEARTBEAT_TIMEOUT_S = 30
# How long a process waits for the coordinator (process 0) to come up; JAX's default.
CONNECT_TIMEOUT_S = 300


def requested() -> bool:
    """Whether the environment asks for a multi-process run (``JAX_NUM_PROCESSES`` set)."""
    return NUM_PROCESSES in os.environ


def initialize() -> None:
    """``jax.distributed.initialize`` with the count and id from the environment.

    Raises DistributedError, naming the variable and the fix, when the environment is
    incomplete or inconsistent, when no cluster is detected in its place, or when no
    coordinator answers within ``CONNECT_TIMEOUT_S``.
    """
    address = os.environ.get(COORDINATOR) or None
    num_processes = _read_int(NUM_PROCESSES)
    process_id = _read_int(PROCESS_ID)
    if num_processes is not None:
        if num_processes < 1:
            raise DistributedError(f"{NUM_PROCESSES}={num_processes} must be at least 1.")
        if process_id is None or not 0 <= process_id < num_processes:
            raise DistributedError(
                f"{PROCESS_ID}={os.environ.get(PROCESS_ID)!r} must be set to this process's "
                f"id in 0..{num_processes - 1} ({NUM_PROCESSES}={num_processes}), a different "
                "one in every process.")
        if address is None:
            raise DistributedError(
                f"{NUM_PROCESSES}={num_processes} is set but {COORDINATOR} is not: set it to "
                "host:port of process 0 (a free port on that host) in every process.")
        if process_id > 0:
            _wait_for_coordinator(address)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address=address, num_processes=num_processes,
                                   process_id=process_id,
                                   initialization_timeout=CONNECT_TIMEOUT_S,
                                   heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S)
    except ValueError as error:
        raise DistributedError(
            f"cannot start a multi-process run: {error} Outside SLURM, Open MPI, Kubernetes "
            f"and Cloud TPU, set {COORDINATOR}, {NUM_PROCESSES} and {PROCESS_ID} in every "
            "process, or start them with python -m bioflax.launch.") from error


def _wait_for_coordinator(address: str) -> None:
    """Returns once ``address`` accepts TCP connections; DistributedError after
    ``CONNECT_TIMEOUT_S`` (JAX itself would abort the process without a word of why)."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    while True:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=1.0).close()
            return
        except (OSError, ValueError) as error:
            if time.monotonic() >= deadline:
                raise DistributedError(
                    f"no coordinator answers at {COORDINATOR}={address} after "
                    f"{CONNECT_TIMEOUT_S} s ({error}): start process 0 with the same address, "
                    "or set it to process 0's host and port.") from None
        time.sleep(0.5)


def _read_int(name: str):
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"{name}={value!r} must be an integer.") from None


def joined() -> bool:
    """Whether this process is part of a multi-process run (:func:`initialize` was called)."""
    return jax.distributed.is_initialized()


def exit_alone(code: int) -> None:
    """Ends this process now with ``code`` if it is part of a multi-process run; else returns.

    A normal exit waits at JAX's shutdown barrier (up to 5 minutes) for every other process,
    which after an error in this one may never come. Leaving without it, this process is
    seen to end at once by the launcher, and by the others within ``HEARTBEAT_TIMEOUT_S``.
    """
    if not joined():
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # pylint: disable=protected-access


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is true on at least one process (every process must call it)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def barrier(name: str) -> None:
    """Waits until every process has reached the barrier ``name``."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
