"""The experiment configs shipped with bioflax (``get_config()`` files for ``--config``)."""

import os
import pathlib

DIRECTORY = pathlib.Path(__file__).resolve().parent


def resolve(argument: str) -> str:
    """``argument`` (``PATH[:ARG]``) with ``PATH`` found among the shipped configs when it
    names no file here (``kp_mnist.py``, ``configs/paper/akrout2019.py:kp``); else
    unchanged."""
    path, colon, variant = argument.partition(":")
    if os.path.exists(path):
        return argument
    parts = pathlib.PurePath(path).parts
    if ".." in parts or pathlib.PurePath(path).is_absolute():
        return argument
    inside = parts[1:] if parts[:1] == ("configs",) else parts
    candidate = DIRECTORY.joinpath(*inside) if inside else None
    if candidate is not None and candidate.is_file():
        return f"{candidate}{colon}{variant}"
    return argument
