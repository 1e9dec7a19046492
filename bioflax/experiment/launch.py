"""Starts one command as N local processes of one multi-process JAX run.

    python -m bioflax.launch --processes=2 --devices-per-process=2 -- \\
        main.py --config=configs/teacher.py --workdir=runs/teacher_2x2

Process ``i`` gets ``JAX_COORDINATOR_ADDRESS`` (127.0.0.1 and a free port),
``JAX_NUM_PROCESSES=N`` and ``JAX_PROCESS_ID=i`` (see :mod:`bioflax.distributed`), and with
``--devices-per-process=D`` that many CPU devices. Its output goes to
``WORKDIR/logs/process_i.log`` (process 0's is also echoed here). If one process fails,
the others are stopped (SIGTERM, then SIGKILL after a grace period) and the launcher exits
non-zero with one ``error:`` line naming the process and its log. Ctrl-C and SIGTERM are
passed on to every process, which checkpoint together and exit.
"""

import argparse
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time

from bioflax import distributed
from bioflax.experiment import workdir as workdir_lib

STOP_GRACE_S = 5.0  # after SIGTERM, how long the other processes get before SIGKILL
_POLL_S = 0.1


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def workdir_of(command: list[str]):
    """The value of ``--workdir`` in ``command``, or None."""
    for i, arg in enumerate(command):
        if arg.startswith("--workdir="):
            return arg.split("=", 1)[1]
        if arg == "--workdir" and i + 1 < len(command):
            return command[i + 1]
    return None


def process_environment(process_id: int, num_processes: int, port: int,
                        devices_per_process=None, base=None) -> dict[str, str]:
    """The environment of process ``process_id``: ``base`` (default: this one's) plus the
    variables :func:`bioflax.distributed.initialize` reads."""
    env = dict(os.environ if base is None else base)
    env.update({distributed.COORDINATOR: f"127.0.0.1:{port}",
                distributed.NUM_PROCESSES: str(num_processes),
                distributed.PROCESS_ID: str(process_id), "PYTHONUNBUFFERED": "1"})
    if devices_per_process:
        flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                       env.get("XLA_FLAGS", ""))
        env["XLA_FLAGS"] = (f"{flags} --xla_force_host_platform_device_count="
                            f"{devices_per_process}").strip()
    return env


def _echo(stream, log, out) -> None:
    for line in stream:
        log.write(line)
        log.flush()
        out.write(line.decode(errors="replace"))
        out.flush()


def _why(returncode: int) -> str:
    if returncode < 0:
        return f"was killed by {signal.Signals(-returncode).name}"
    return f"exited with status {returncode}"


def _last_error_line(log_path: pathlib.Path) -> str:
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    errors = [line for line in lines if line.startswith("error: ")]
    return f" Its last error: {errors[-1][len('error: '):]}" if errors else ""


def launch(command: list[str], num_processes: int, logdir: pathlib.Path,
           devices_per_process=None) -> int:
    """Runs ``command`` as ``num_processes`` processes; returns the exit status to use."""
    if command and command[0].endswith(".py"):
        command = [sys.executable, *command]
    processes, logs, threads = _start(command, num_processes, logdir, devices_per_process)

    # Exits are collected here as they happen (os.waitpid), so that the first process to
    # fail is the one named: the others fail soon after it, on their collectives.
    running, failed, forwarded = {p.pid: i for i, p in enumerate(processes)}, None, []

    def forward(signum, frame):
        del frame
        forwarded.append(signum)
        for pid in list(running):  # not yet reaped, so the pid is still theirs
            try:
                os.kill(pid, signum)
            except ProcessLookupError:  # reaped since the list was taken
                pass

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while running and failed is None:
            pid, status = os.waitpid(-1, 0)
            if pid in running:
                i = running.pop(pid)
                processes[i].returncode = os.waitstatus_to_exitcode(status)
                failed = i if processes[i].returncode else None
        if failed is not None and not forwarded:
            _stop(processes)
        for process in processes:
            process.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for thread in threads:
            thread.join(timeout=5)
        for log, _ in logs:
            log.close()
    if failed is None:
        return 0
    code = processes[failed].returncode
    if not forwarded:
        log_path = logs[failed][1]
        print(f"error: process {failed} of {num_processes} (pid {processes[failed].pid}) "
              f"{_why(code)}, so the other processes were stopped. Its log: {log_path}."
              f"{_last_error_line(log_path)}", file=sys.stderr)
    return code if code > 0 else 128 - code


def _start(command: list[str], num_processes: int, logdir: pathlib.Path,
           devices_per_process) -> tuple[list, list, list]:
    """Starts the processes, each in its own session with its output in
    ``logdir/process_I.log`` (process 0's also echoed to stderr): ``(processes, (log file,
    log path) per process, echo threads)``."""
    logdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    processes, logs, threads = [], [], []
    for i in range(num_processes):
        log_path = logdir / f"process_{i}.log"
        log = open(log_path, "wb")  # pylint: disable=consider-using-with
        env = process_environment(i, num_processes, port, devices_per_process)
        echo = i == 0
        process = subprocess.Popen(  # pylint: disable=consider-using-with
            command, env=env, stdout=subprocess.PIPE if echo else log,
            stderr=subprocess.STDOUT, start_new_session=True)
        if echo:
            thread = threading.Thread(target=_echo, args=(process.stdout, log, sys.stderr),
                                      daemon=True)
            thread.start()
            threads.append(thread)
        processes.append(process)
        logs.append((log, log_path))
    return processes, logs, threads


def _stop(processes) -> None:
    """SIGTERM to every live process, SIGKILL to those alive ``STOP_GRACE_S`` later."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    while any(p.poll() is None for p in processes) and time.monotonic() < deadline:
        time.sleep(_POLL_S)
    for process in processes:
        if process.poll() is None:
            process.kill()


def _usage_error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bioflax.launch", description=__doc__.split("\n\n", 1)[0],
        usage="%(prog)s --processes=N [--devices-per-process=D] [--logdir=DIR] -- COMMAND")
    parser.add_argument("--processes", type=int, required=True,
                        help="number of local processes")
    parser.add_argument("--devices-per-process", type=int, default=None,
                        help="CPU devices of each process (XLA_FLAGS); default: unchanged")
    parser.add_argument("--logdir", default=None,
                        help="where process_I.log go; default: WORKDIR/logs of the command")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="the command every process runs, after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        return _usage_error("no command to run: put it after --, e.g. "
                            "-- main.py --config=CONFIG --workdir=DIR.")
    if args.processes < 1:
        return _usage_error(f"--processes={args.processes} must be at least 1.")
    if args.devices_per_process is not None and args.devices_per_process < 1:
        return _usage_error(
            f"--devices-per-process={args.devices_per_process} must be at least 1.")
    logdir = args.logdir
    if logdir is None:
        workdir = workdir_of(command)
        if workdir is None:
            return _usage_error("the command has no --workdir for the logs to go to: add "
                                "--logdir=DIR before --.")
        logdir = os.path.join(workdir, workdir_lib.LOGS_DIR)
    return launch(command, args.processes, pathlib.Path(logdir), args.devices_per_process)


if __name__ == "__main__":
    sys.exit(main())
