"""The reference of every config field: its default and the comment that explains it in
:mod:`bioflax.experiment.configs.default`, as Markdown tables (one per section), written
into the documentation when it is built."""

import ast
import inspect
import re

import ml_collections

from bioflax.experiment.configs import default
from bioflax.procedures import PROCEDURES

_FIELD = re.compile(r"^\s*((?:\w+\.)+\w+)\s*=(?!=)")  # `data.batch_size = ...`


def field_comments() -> dict[str, str]:
    """``{'data.batch_size': 'global training batch, ...'}``: for each field assigned in
    ``default.get_config``, the comment on its line, or else the comment lines above it
    (which also explain the fields assigned right after it, up to a blank line)."""
    source = inspect.getsource(default.get_config)
    aliases = {alias.id: target.attr for node in ast.walk(ast.parse(source))
               if isinstance(node, ast.Assign) and len(node.targets) == 2
               for target, alias in [node.targets] if isinstance(target, ast.Attribute)
               and isinstance(alias, ast.Name)}  # `config.data = data = ConfigDict()`
    comments, above, block = {}, [], ""
    for line in source.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# "))
            continue
        block = " ".join(above) or (block if stripped else "")
        match = _FIELD.match(line)
        if match:
            owner, _, name = match.group(1).partition(".")
            path = name if owner == "config" else f"{aliases.get(owner, owner)}.{name}"
            inline = line.split("  # ", 1)[1].strip() if "  # " in line else ""
            comments[path] = inline or block
        above = []
    return comments


def _leaves(config: ml_collections.ConfigDict, prefix: str = ""):
    for name, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield from _leaves(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", value


def markdown() -> str:
    """One table per section (``data``, ``model``, ...) of field, default and meaning."""
    comments = field_comments()
    order = {path: i for i, path in enumerate(comments)}
    sections: dict[str, list[str]] = {}
    for path, value in sorted(_leaves(default.get_config()),  # in the order of the source
                              key=lambda leaf: order.get(leaf[0], len(order))):
        section = path.split(".")[0] if "." in path else "top level"
        parts = path.split(".")
        meaning = (comments[path] if path in comments else
                   f"an option of `bioflax.procedures.{PROCEDURES[parts[1]].__name__}`"
                   if parts[0] == "procedure" else "")
        sections.setdefault(section, []).append(
            f"| `{path}` | `{value!r}` | {meaning.replace('|', '/')} |")
    out = []
    for section, rows in sections.items():
        out += [f"## {section}", "", "| field | default | meaning |", "| --- | --- | --- |",
                *rows, ""]
    return "\n".join(out)
