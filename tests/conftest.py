"""Shared pytest setup."""

import atexit
import os
import pathlib
import shutil
import tempfile

import pytest

# Use the offline TFDS copy next to the repository (../shared/data/tensorflow_datasets)
# unless the environment already names a TFDS data dir.
_SHARED_TFDS = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tensorflow_datasets"
if "TFDS_DATA_DIR" not in os.environ and _SHARED_TFDS.is_dir():
    os.environ["TFDS_DATA_DIR"] = str(_SHARED_TFDS)

# One persistent XLA compilation cache for the session, shared with the main.py processes the
# end-to-end tests start (they inherit the environment): the many short runs of the same
# configs then compile each program once instead of once per process.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="bioflax-test-xla-cache-")
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
    os.environ.update({"JAX_COMPILATION_CACHE_DIR": _CACHE,
                       "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                       "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"})


def pytest_collection_modifyitems(items):
    """Tests that read the whole real MNIST (the ``mnist`` fixture of test_data.py) are
    end-to-end tests of the harness's data: ``pytest -m "not e2e"`` leaves them out."""
    for item in items:
        if "mnist" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.e2e)
