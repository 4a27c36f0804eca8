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


def snapshot(obj: Any, buffers: dict[Any, torch.Tensor] | None = None) -> Any:
    """A deep copy of a (nested dict/list/tuple) state whose tensors live on the CPU and share
    nothing with the live model or optimizer. CUDA tensors are copied into pinned memory with
    non-blocking copies and one synchronisation at the end. ``buffers`` (path -> pinned
    tensor) keeps the pinned host buffers from one snapshot to the next: pinning gigabytes per
    save is slow, so they are allocated once and reused (the caller must not reuse them while
    a write of the previous snapshot is in flight)."""
    pending = []
    path: list[Any] = []

    def copy(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            x = x.detach()
            if x.is_cuda:
                key = tuple(path)
                out = None if buffers is None else buffers.get(key)
                if out is None or out.shape != x.shape or out.dtype != x.dtype:
                    out = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
                    if buffers is not None:
                        buffers[key] = out
                out.copy_(x, non_blocking=True)
                pending.append(out)
                return out
            return x.clone()
        if isinstance(x, dict):
            return type(x)((k, _at(k, v)) for k, v in x.items())
        if isinstance(x, (list, tuple)):
            return type(x)(_at(i, v) for i, v in enumerate(x))
        return x

    def _at(k: Any, v: Any) -> Any:
        path.append(k)
        try:
            return copy(v)
        finally:
            path.pop()

    out = copy(obj)
    if pending:
        torch.cuda.synchronize()
    return out


class AsyncCheckpointWriter:
    """At most one background write in flight; ``save`` waits for the previous one.

    ``background=False`` writes in the calling thread: on a CPU-only run a background write
    takes cores (and the GIL) from the training step itself, so nothing is gained."""

    def __init__(self, background: bool = True) -> None:
        self.background = background
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._buffers: dict[Any, torch.Tensor] = {}  # pinned host copies, reused per save

    def save(self, fn: Callable[..., Any], state: Any, *args: Any, **kwargs: Any) -> None:
        """Run ``fn(snapshot(state), *args, **kwargs)`` in the background."""
        self.wait()
        if not self.background:
            fn(state, *args, **kwargs)
            return
        snap = snapshot(state, self._buffers)  # the previous write is done: reuse its buffers

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
