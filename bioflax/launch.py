"""``python -m bioflax.launch``: the multi-process launcher of the experiment harness
(:mod:`bioflax.experiment.launch`), under its established name."""

import sys

from bioflax.experiment.launch import main

if __name__ == "__main__":
    sys.exit(main())
