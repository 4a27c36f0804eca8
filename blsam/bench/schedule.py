"""The one timing schedule: round-robin over live workers, one call per worker per round, so
a drifting machine slows every model alike; a worker that fails is dropped, the others go on."""
from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

from blsam.utils.jobs import WorkerError

from .config import BenchConfig
from .jobs import start_job

T = TypeVar("T")


def interleaved(items: Sequence[T], rounds: int, call: Callable[[T], None],
                on_error: Callable[[T, WorkerError], None]) -> list[T]:
    """``rounds`` rounds; each round ``call``s every live item once, in order. An item whose
    call raises ``WorkerError`` is handed to ``on_error`` and left out of later rounds.
    Returns the items still live."""
    live = list(items)
    for _ in range(rounds):
        for item in list(live):
            try:
                call(item)
            except WorkerError as e:
                live.remove(item)
                on_error(item, e)
    return live


def drop_with_warning(handles: list) -> Callable[[object, WorkerError], None]:
    """The ``on_error`` of the photo and end-to-end rows: warn, close, drop from ``handles``."""

    def drop(h, e: WorkerError) -> None:
        print(f"warning: {h.job['name']}: {e}; its rows are left out", file=sys.stderr)
        if h in handles:
            handles.remove(h)
        h.close()

    return drop



def started(cfg: BenchConfig, jobs: list[dict[str, object]], malloc: str) -> list:
    """Start every job (in its own process unless ``--isolation shared``), build them one by
    one, and drop those that failed with a warning."""
    handles = [start_job(cfg, j, malloc) for j in jobs]
    live = []
    for h in handles:
        if "error" in h.hello:
            print(f"warning: {h.job['name']}: {h.hello['error']}", file=sys.stderr)
            h.close()
        else:
            live.append(h)
    return live


def call_or_drop(h, handles: list, cmd: str, arg: str) -> dict[str, object] | None:
    """``h.call``; a worker that fails (e.g. killed for memory) is dropped from ``handles``
    with a warning, so the other models' rows still come out."""
    try:
        return h.call(cmd, arg)
    except WorkerError as e:
        drop_with_warning(handles)(h, e)
        return None


def warm_up(handles: list, cmd: str, arg: str, n: int) -> None:
    """``n`` untimed calls of ``cmd`` on every worker (failing ones dropped)."""
    for h in list(handles):
        for _ in range(n):
            if h in handles:
                call_or_drop(h, handles, cmd, arg)
