"""Sphinx configuration of bioflax's documentation (MyST Markdown pages, API reference from
the docstrings): ``make docs`` builds it into docs/_build/html with warnings as errors."""

project = "bioflax"
author = "The bioflax developers"
copyright = "2026, The bioflax developers"  # pylint: disable=redefined-builtin

extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon"]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]
myst_heading_anchors = 3
autodoc_member_order = "bysource"
autodoc_typehints = "none"
napoleon_google_docstring = True
html_theme = "alabaster"
# The stored run reports (docs/results/*/report.md, written by bioflax.experiment.report)
# are tables without a title; they are reached from results.md's links.
suppress_warnings = ["toc.no_title"]
exclude_patterns += ["_generated"]


def _write_config_reference(app):
    """docs/_generated/config.md: the table of every config field (config.md includes it)."""
    import pathlib  # pylint: disable=import-outside-toplevel
    from bioflax.experiment.configs import reference  # pylint: disable=import-outside-toplevel
    out = pathlib.Path(app.srcdir) / "_generated" / "config.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(reference.markdown(), encoding="utf-8")


def setup(app):
    app.connect("builder-inited", _write_config_reference)
