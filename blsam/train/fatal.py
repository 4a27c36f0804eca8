"""Deterministic failures are not retried by torchrun: a restart finds the previous attempt's
fatal record and exits at once with it, before any model is built.

Why: torchrun restarts every non-zero exit. Under ``--max-restarts 3`` a user error (exit 2)
or the non-finite stop (exit 3) ran four times, each repeating setup (every rank CRC-checks and
scans a 9 GB h_b checkpoint) and up to ``save_every`` steps, then failed the same way.

The record is scoped to one torchrun job on one host: the agent process (the workers' parent,
with its start time, so a reused pid does not match), ``TORCHELASTIC_RUN_ID`` and the attempt
that wrote it (``TORCHELASTIC_RESTART_COUNT``). Only a later attempt of the same agent obeys
it: a new ``torchrun`` (a fixed config, a SLURM requeue) starts at restart 0 under another
agent and is never refused. Outside torchrun nothing is written or read. Crashes, rank-local
failures (exit 1) and preemption (75) are still retried: they may not happen again.
"""
from __future__ import annotations

import io
import json
import os
import re
import socket
import sys
import tempfile
from collections.abc import Callable
from typing import Any, TextIO

DETERMINISTIC = {2: "a user error", 3: "too many non-finite steps"}


def _attempt() -> int | None:
    """This worker's torchrun attempt (0 = first), or None outside torchrun."""
    v = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    return int(v) if v is not None and v.isdigit() else None


def _agent_start(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "?"


def record_path() -> str:
    """This host's record file for the torchrun job whose agent started this worker."""
    ppid = os.getppid()
    job = re.sub(r"[^A-Za-z0-9_.-]", "_", os.environ.get("TORCHELASTIC_RUN_ID", "none"))[:64]
    folder = os.path.join(tempfile.gettempdir(), f"blsam-fatal-{os.getuid()}")
    return os.path.join(folder, f"{socket.gethostname()}-{ppid}-{_agent_start(ppid)}-{job}.json")


def previous_fatal() -> dict[str, Any] | None:
    """The fatal record of an earlier attempt of this torchrun job, or None."""
    now = _attempt()
    if not now:
        return None
    try:
        with open(record_path(), encoding="utf-8") as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or int(rec.get("attempt", now)) >= now:
        return None
    return rec


def write_record(code: int, message: str) -> None:
    """Note a deterministic exit, when torchrun will restart this worker."""
    now = _attempt()
    left = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0)
    if now is None or code not in DETERMINISTIC or now >= left:
        return
    from ..utils.files import write_json_atomic

    try:
        path = record_path()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_json_atomic({"code": code, "message": message, "attempt": now,
                           "rank": os.environ.get("RANK")}, path)
    except OSError:
        pass  # no record: torchrun retries, as before


class _Tee(io.TextIOBase):
    """stderr, remembering the last ``error:`` line (the one-line message of the exit)."""

    def __init__(self, inner: TextIO) -> None:
        self.inner, self.last = inner, ""

    def write(self, s: str) -> int:
        for ln in s.splitlines():
            if ln.startswith("error:"):
                self.last = ln[len("error:"):].strip()
        return self.inner.write(s)

    def flush(self) -> None:
        self.inner.flush()


def guarded(run: Callable[[], int]) -> int:
    """``run()`` unless an earlier attempt of this torchrun job failed deterministically (then
    its line again and its code, at once); a deterministic exit of ``run()`` is recorded."""
    rec = previous_fatal()
    if rec is not None:
        code = int(rec.get("code", 2))
        sys.stderr.write(f"error: {rec.get('message') or DETERMINISTIC.get(code)} [not "
                         f"retried: attempt {rec.get('attempt')} of this torchrun job ended "
                         f"with it (exit {code}, {DETERMINISTIC.get(code)}); fix it and start "
                         f"a new torchrun]\n")
        sys.stderr.flush()
        return code
    if _attempt() is None:
        return run()
    tee = _Tee(sys.stderr)
    old, sys.stderr = sys.stderr, tee  # type: ignore[assignment]
    try:
        code = run()
    finally:
        sys.stderr = old
    write_record(code, tee.last)
    return code
