"""The documentation site builds without a warning (Sphinx, warnings as errors)."""

import subprocess
import sys

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
