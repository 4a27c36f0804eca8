"""The one atomic file write: a temporary file in the same folder, flushed and fsynced, then
renamed over the target. A crash mid-write leaves the previous file intact, never a torn one;
the temporary name ``.<name>.tmp.<pid>`` lets cleanup code tell whose it was. Also the one
file hash (``file_sha256``, memoised) that records which weights or annotations a result used."""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from typing import IO, Any


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


def wait_for_later_event_file(log_dir: str | os.PathLike) -> None:
    """Sleep until the clock's second is past every TensorBoard event file in ``log_dir``.

    TensorBoard reads a folder's event files in name order, and the name starts with the
    creation second, then a per-process counter compared as text ("10" < "9"): a resumed run
    whose file is made in the same second as the previous one can sort before it, and its
    ``purge_step`` would then purge the wrong events."""
    import glob
    import time

    stamps = []
    for f in glob.glob(os.path.join(os.fspath(log_dir), "events.out.tfevents.*")):
        part = os.path.basename(f).split(".")[3:4]
        if part and part[0].isdigit():
            stamps.append(int(part[0]))
    if stamps:
        delay = max(stamps) + 1 - time.time()
        if 0 < delay <= 2:
            time.sleep(delay)


_HASHES: dict[tuple[str, int, float], str] = {}


def file_sha256(path: str | os.PathLike, digits: int | None = None) -> str:
    """sha256 of a file (its first ``digits`` hex digits), memoised per (path, size, mtime):
    a ViT-H checkpoint is 2.5 GB and is hashed by several records of one run."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key][:digits]
