"""Trains and evaluates a bioflax experiment: ``python main.py --config=CONFIG --workdir=DIR``
(the same command as ``bioflax-train`` of an installed package)."""

from bioflax.experiment.main import run

if __name__ == "__main__":
    run()
