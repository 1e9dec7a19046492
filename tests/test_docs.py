"""The documentation site builds without a warning (Sphinx, warnings as errors)."""

import subprocess
import sys

from bioflax.experiment.configs import default, reference
from e2e import REPO


def test_the_docs_site_builds_without_warnings(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         "-d", str(tmp_path / "doctrees"), str(REPO / "docs"), str(tmp_path / "html")],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    api = (tmp_path / "html" / "api.html").read_text()
    for documented in ("bioflax.converter.convert", "WeightMirror", "NnxAdapter", "Trainer"):
        assert documented in api, documented
    assert "optimizer.nesterov" in (tmp_path / "html" / "config.html").read_text()


def test_the_config_reference_explains_every_field_of_the_default_config():
    rows = [line for line in reference.markdown().splitlines() if line.startswith("| `")]
    fields = [path for path, _ in reference._leaves(default.get_config())]
    assert sorted(row.split("`")[1] for row in rows) == sorted(fields)
    unexplained = [row for row in rows if row.endswith("|  |")]
    assert not unexplained, "give these fields a comment in default.py:\n" + "\n".join(
        unexplained)
    assert ("| `data.normalize_std` | `None` | Image pixels in [0, 1] become (x - mean) / "
            "std") in "\n".join(rows)  # a comment above two fields explains both
