"""Runs a grid of configs × seeds, each run in its own workdir, resumably.

``python -m bioflax.experiment.sweep configs/paper/akrout2019.py:fa configs/paper/akrout2019.py:kp
--seeds=0,1,2 --root=runs/paper``

Run ``SPEC`` with seed ``S`` is ``main.py --config=SPEC --config.seed=S
--workdir=ROOT/NAME/seed_S`` in a process of its own, where NAME is the config file's stem
and its argument (``akrout2019_fa``). A workdir that holds ``result.json`` is a finished run
and is skipped; an unfinished one resumes from its checkpoints, so rerunning the same command
after a crash or Ctrl-C continues the grid. A failed run is reported and the grid goes on;
an interrupted one (Ctrl-C, SIGTERM) stops the sweep.
"""

import argparse
import os
import subprocess
import sys
from typing import Optional, Sequence

from bioflax.experiment import configs
from bioflax.experiment.workdir import RESULT_FILE, seed_dir

MAIN = ("-m", "bioflax.experiment.main")  # the experiment command line, as bioflax-train
INTERRUPTED = (130, 143)  # its exit codes for SIGINT and SIGTERM


def run_name(spec: str) -> str:
    """``configs/paper/akrout2019.py:fa`` → ``akrout2019_fa``."""
    path, _, argument = spec.partition(":")
    stem = os.path.splitext(os.path.basename(path))[0]
    return f"{stem}_{argument}" if argument else stem


def workdir(root: str, spec: str, seed: int) -> str:
    return os.path.join(root, run_name(spec), seed_dir(seed))


def command(spec: str, seed: int, root: str, overrides: Sequence[str]) -> list[str]:
    return ([sys.executable, *MAIN, f"--config={spec}", f"--config.seed={seed}",
             f"--workdir={workdir(root, spec, seed)}"]
            + [f"--config.{override}" for override in overrides])


def run_grid(specs: Sequence[str], seeds: Sequence[int], root: str,
             overrides: Sequence[str] = (), dry_run: bool = False) -> int:
    """Runs every unfinished (spec, seed); returns 0, 1 (some run failed) or main.py's
    interrupt code."""
    for spec in specs:
        config_file = configs.resolve(spec).partition(":")[0]
        if not os.path.isfile(config_file):
            print(f"error: config file {config_file} not found", file=sys.stderr)
            return 2
    failed = []
    for seed in seeds:  # seed-major: every config has a first seed before any has a second
        for spec in specs:
            run_dir = workdir(root, spec, seed)
            if os.path.exists(os.path.join(run_dir, RESULT_FILE)):
                print(f"[sweep] {run_dir}: finished, skipped", flush=True)
                continue
            cmd = command(spec, seed, root, overrides)
            print(f"[sweep] {run_dir}: {' '.join(cmd[1:])}", flush=True)
            if dry_run:
                continue
            code = subprocess.call(cmd)
            if code in INTERRUPTED:
                print(f"[sweep] interrupted in {run_dir}; run the same command to go on.",
                      file=sys.stderr)
                return code
            if code:
                failed.append(run_dir)
                print(f"[sweep] {run_dir} failed with exit code {code}", file=sys.stderr)
    if failed:
        print(f"[sweep] {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("specs", nargs="+", help="config files, each optionally with :ARG")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--root", default="runs/sweep", help="parent of the run workdirs")
    parser.add_argument("--override", action="append", default=[], metavar="FIELD=VALUE",
                        help="a config override for every run, e.g. training.epochs=10")
    parser.add_argument("--dry_run", action="store_true", help="print the runs, run nothing")
    args = parser.parse_args(argv)
    try:
        seeds = [int(seed) for seed in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds={args.seeds}: give integers separated by commas, e.g. 0,1,2")
    return run_grid(args.specs, seeds, args.root, args.override, args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
