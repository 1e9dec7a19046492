"""Shared pytest setup."""

import os
import pathlib

# Use the offline TFDS copy next to the repository (../shared/data/tensorflow_datasets)
# unless the environment already names a TFDS data dir.
_SHARED_TFDS = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tensorflow_datasets"
if "TFDS_DATA_DIR" not in os.environ and _SHARED_TFDS.is_dir():
    os.environ["TFDS_DATA_DIR"] = str(_SHARED_TFDS)
