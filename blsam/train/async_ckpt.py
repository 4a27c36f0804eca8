"""Checkpoints that do not stall training: snapshot now, write in a background thread.

An h_b training checkpoint (weights + AdamW moments) is about 9 GB. Writing it takes tens of
seconds during which, synchronously, every rank waits at the barrier. Here the training thread
only copies the state off the device (a snapshot: later optimizer steps cannot change what is
written) and a single background thread does the ``torch.save`` with the usual atomic rename,
keeping the last good file. A new save, or ``wait``, first finishes the previous one, and an
error in the writer surfaces in the training thread at the next save/wait, never silently.

Resuming loads memory-mapped (``blsam.train.resume.load_training_checkpoint``): tensors are
paged in as ``load_state_dict`` copies them instead of reading the whole file into memory first.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

from .pinned import PinnedPool, flat_layout, views


def snapshot(obj: Any, pool: PinnedPool | None = None) -> tuple[Any, torch.Tensor | None]:
    """A deep copy of a (nested dict/list/tuple) state whose tensors live on the CPU and share
    nothing with the live model or optimizer, and the pinned buffer it uses (or None). CUDA
    tensors are copied, non-blocking, into ONE page-locked buffer of their total size from
    ``pool`` (``blsam.train.pinned``: not the power-of-two blocks of torch's pinned allocator,
    12 GiB pinned for an 8.6 GiB h_b state) with one synchronisation at the end; the caller
    gives the buffer back to the pool once the write of this snapshot is done."""
    cuda: list[torch.Tensor] = []

    def find(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            if x.is_cuda:
                cuda.append(x.detach())
        elif isinstance(x, dict):
            for v in x.values():
                find(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                find(v)

    find(obj)
    buf, copies = pinned_copies(cuda, pool or PinnedPool()) if cuda else (None, [])
    it = iter(copies)

    def copy(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return next(it) if x.is_cuda else x.detach().clone()
        if isinstance(x, dict):
            return type(x)((k, copy(v)) for k, v in x.items())
        if isinstance(x, (list, tuple)):
            return type(x)(copy(v) for v in x)
        return x

    out = copy(obj)
    if cuda:
        torch.cuda.synchronize()
    return out, buf


def pinned_copies(tensors: list[torch.Tensor], pool: PinnedPool
                  ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``tensors`` copied (non-blocking) into views of one buffer of ``pool``."""
    offsets, n = flat_layout(tensors)
    buf = pool.take(n)
    out = views(buf, tensors, offsets)
    for dst, src in zip(out, tensors):
        dst.copy_(src, non_blocking=True)
    return buf, out


class AsyncCheckpointWriter:
    """At most one background write in flight; ``save`` waits for the previous one.

    ``background=False`` writes in the calling thread: on a CPU-only run a background write
    takes cores (and the GIL) from the training step itself, so nothing is gained."""

    def __init__(self, background: bool = True) -> None:
        self.background = background
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._pool: PinnedPool | None = None  # page-locked snapshot buffers, reused per save
        self._buf: torch.Tensor | None = None  # the in-flight snapshot's buffer

    def save(self, fn: Callable[..., Any], state: Any, *args: Any, **kwargs: Any) -> None:
        """Run ``fn(snapshot(state), *args, **kwargs)`` in the background."""
        self.wait()
        if not self.background:
            fn(state, *args, **kwargs)
            return
        if self._pool is None:
            self._pool = PinnedPool()
        if self._buf is not None:  # the previous write is done: its buffer can be reused
            self._pool.give(self._buf)
        snap, self._buf = snapshot(state, self._pool)

        def run() -> None:
            try:
                fn(snap, *args, **kwargs)
            except BaseException as e:  # re-raised in the training thread
                self._error = e

        self._thread = threading.Thread(target=run, name="checkpoint-writer", daemon=False)
        self._thread.start()

    def check(self) -> None:
        """Raise a finished background write's error now (called every step, so a failed save
        stops the run at the next step, not at the next save); never blocks."""
        if self._thread is not None and not self._thread.is_alive():
            self.wait()
        elif self._error is not None:
            self.wait()

    def wait(self) -> None:
        """Block until the write in flight is on disk; raise its error if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"background checkpoint write failed: {err}") from err

    def release(self) -> None:
        """After the last write: unregister the pinned snapshot buffers."""
        self.wait()
        if self._pool is not None:
            self._pool.release()
        self._pool = self._buf = None
