"""The one atomic file write: a temporary file in the same folder, flushed and fsynced, then
renamed over the target. A crash mid-write leaves the previous file intact, never a torn one;
the temporary name ``.<name>.tmp.<pid>`` lets cleanup code tell whose it was."""
from __future__ import annotations

import json
import os
from typing import IO, Any, Callable


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> str:
    """Call ``write(f)`` on a binary temp file, fsync it, rename it to ``path``; returns path."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> str:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_json_atomic(obj: Any, path: str | os.PathLike, indent: int | None = None) -> str:
    return write_text_atomic(path, json.dumps(obj, indent=indent))
