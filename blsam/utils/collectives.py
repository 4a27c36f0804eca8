"""Collectives for long rank-0-only work: gather to rank 0 only, and errors that every rank
sees at once.

Why a module of its own: ``blsam.utils.dist`` serves training too; these helpers are what the
evaluation and the teacher cache need at full scale (LVIS val, a multi-hour ViT-H cache):

* ``DEFAULT_TIMEOUT_MIN``: NCCL's default watchdog is 10 minutes, far shorter than a
  rank-0-only LVISEval or another rank's 30-minute re-encode; the callers pass an explicit
  ``--dist-timeout`` (minutes, as in training) to ``dist.init_distributed`` and record it.
* ``gather_to_main``: per-rank results go to rank 0 only (``gather_object``), not copied into
  every rank's memory.
* ``fail_together``: the failing rank prints its error at once (one line on stderr, the
  traceback in a log file), publishes it in the process group's store, then waits for the
  others; the others poll ``check_peers`` (once per image) and join at once with that error.
  Every rank ends non-zero within the timeout even if a peer never reaches the collective.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import sys
import traceback
from collections.abc import Iterator
from typing import Any

import torch.distributed as dist

from .dist import RankError, _portable, default_store

DEFAULT_TIMEOUT_MIN = 240.0  # generous: a full LVISEval or a ViT-H part re-encode fits
ERROR_KEY = "blsam/fail_together/error"


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` in rank order on rank 0, None on the other ranks (``[obj]`` in one
    process)."""
    if not _active():
        return [obj]
    rank = dist.get_rank()
    out: list[Any] | None = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


class PeerFailed(RuntimeError):
    """Raised on a healthy rank (by ``check_peers``) when another rank has failed."""


def check_peers() -> None:
    """Raise ``PeerFailed`` if another rank has published an error (cheap: one store check)."""
    if not _active():
        return
    store = default_store()  # None: peers learn of it at the next gather
    if store is not None and store.check([ERROR_KEY]):
        raise PeerFailed("another rank failed")


def _rebuild(status: Any) -> BaseException:
    cls, msg = status
    try:
        exc = cls(msg)
    except Exception:
        exc = RankError(msg)
    return exc


@contextlib.contextmanager
def fail_together(log_dir: str | None = None, announce: bool = True) -> Iterator[None]:
    """Run a block on every rank; if it raises on any rank, it raises on every rank (the
    lowest failing rank's error, its type kept and its message prefixed with the rank).

    Why: a rank that fails alone (a corrupt image in its shard, a full disk) would otherwise
    leave the others waiting in the next collective until the process group times out.

    ``announce``: the failing rank writes ``error: on rank R: ...`` to stderr at once (the
    traceback goes to ``<log_dir>/error_rank<R>.log``), so the error is seen even if a peer
    never arrives; the raised exception then has ``printed = True`` (``blsam-train`` prints its
    own line per rank instead: ``announce=False``). When every rank agreed (the small gather
    succeeded), the exception has ``all_ranks = True``. In one process this is a no-op.
    """
    if not _active():
        yield
        return
    err: BaseException | None = None
    try:
        yield
    except PeerFailed:
        pass  # the failing rank's own error arrives through the gather below
    except Exception as e:  # KeyboardInterrupt etc. still end this rank at once
        err = e
    rank = dist.get_rank()
    mine = None if err is None else _portable(err, rank)
    if err is not None:
        if announce:
            sys.stderr.write(f"error: {mine[1]}\n")
            sys.stderr.flush()
        if log_dir:
            try:
                os.makedirs(log_dir, exist_ok=True)
                with open(os.path.join(log_dir, f"error_rank{rank}.log"), "w") as f:
                    traceback.print_exception(type(err), err, err.__traceback__, file=f)
            except OSError:
                pass
        store = default_store()
        if store is not None:
            try:
                store.set(ERROR_KEY, pickle.dumps(mine))
            except Exception:
                pass
    try:
        status: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(status, mine)
    except Exception as gather_err:  # a peer is gone or stuck past the timeout
        if err is not None:
            err.printed = announce
            raise err from gather_err
        exc: BaseException = RankError(f"a peer rank failed and this rank could not agree with "
                                       f"it: {gather_err}")
        store = default_store()
        try:
            if store is not None and store.check([ERROR_KEY]):
                exc = _rebuild(pickle.loads(store.get(ERROR_KEY)))
        except Exception:
            pass
        raise exc from gather_err
    for st in status:
        if st is not None:
            exc = _rebuild(st)
            exc.all_ranks = True  # a CLI may print it, then ``barrier()``, then exit
            exc.printed = announce and st == mine  # this rank wrote the line already
            raise exc from err
