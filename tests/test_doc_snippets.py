"""Every code block of the README and the documentation runs: a page's Python blocks are
executed here in order, in one namespace (as a reader runs them), unless the line before a
block says which test runs it (``<!-- run by: tests/FILE -->``) or why it cannot run in a
test (``<!-- not run: REASON -->``); a shell block needs one of the two."""

import re

import pytest

from e2e import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
_BLOCK = re.compile(r"(?:^<!-- (run by|not run): (.+?) -->\n)?^```(\w+)\n(.*?)^```$", re.M | re.S)
SHELLS = ("bash", "sh", "console", "shell")


def blocks():
    """``(page, line, language, marker, note, code)`` of every fenced block with a
    language of Python or a shell."""
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for match in _BLOCK.finditer(text):
            marker, note, language, code = match.groups()
            if language == "python" or language in SHELLS:
                line = text[:match.start(3)].count("\n") + 1
                found.append((page, line, language, marker, note, code))
    return found


def _name(block):
    page, line = block[0], block[1]
    return f"{page.relative_to(REPO)}:{line}"


BLOCKS = blocks()
RUN_HERE = sorted({b[0] for b in BLOCKS if b[2] == "python" and b[3] is None})


def test_every_shell_block_says_why_it_is_not_run_here():
    unmarked = [_name(b) for b in BLOCKS if b[2] in SHELLS and b[3] is None]
    assert not unmarked, ("mark these with <!-- not run: REASON --> or "
                          f"<!-- run by: tests/FILE -->: {unmarked}")


def test_a_block_run_by_a_test_names_a_test_that_reads_its_page():
    for page, line, _, marker, note, _ in BLOCKS:
        if marker == "run by":
            test = REPO / note.strip()
            assert test.is_file(), f"{page.name}:{line}: {note} does not exist"
            assert page.name in test.read_text(encoding="utf-8"), (
                f"{page.name}:{line}: {note} does not read {page.name}")


@pytest.mark.parametrize("page", RUN_HERE, ids=[str(p.relative_to(REPO)) for p in RUN_HERE])
def test_python_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks that write files write them here
    namespace: dict = {}
    for block_page, line, language, marker, _, code in BLOCKS:
        if block_page == page and language == "python" and marker is None:
            # Padded so that a traceback names the block's line in its page.
            exec(compile("\n" * line + code, str(page), "exec"),  # pylint: disable=exec-used
                 namespace)
