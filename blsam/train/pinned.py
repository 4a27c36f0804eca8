"""Page-locked host buffers of the size asked for, reused: the checkpoint snapshot and the
packed batches.

Why: torch's caching host allocator (``tensor.pin_memory()``, ``torch.empty(...,
pin_memory=True)``, the DataLoader's ``pin_memory=True``) rounds every request up to a power of
two and keeps the block for the process's life. The 8.6 GiB rank-0 snapshot of an h_b run
pinned 12 GiB in power-of-two pieces; each 72 MB packed batch pinned 128 MB, with 8 workers x
prefetch 2 in flight ~2 GiB per rank, ~16 GiB per node. Here a buffer is ordinary host memory
registered with the driver (``cudaHostRegister``) at its size rounded to ``GRANULE``, reused
while a request fits it, and unregistered by ``release``.

The driver calls are the only CUDA-specific lines (``cuda_register``/``cuda_unregister``); the
pool's logic takes them as arguments, so it is tested on CPU with recording stand-ins.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

GRANULE = 2 << 20  # 2 MiB: huge-page sized, and no request more than 2 MiB over its size

Register = Callable[[int, int], None]


def cuda_register(ptr: int, nbytes: int) -> None:
    err = torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0)
    if int(getattr(err, "value", err)) != 0:
        raise RuntimeError(f"cudaHostRegister of {nbytes} bytes failed (error {err})")


def cuda_unregister(ptr: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(ptr)


def rounded(nbytes: int) -> int:
    return max(GRANULE, -(-nbytes // GRANULE) * GRANULE)


class PinnedPool:
    """Reusable page-locked uint8 buffers. ``take(n)`` returns a buffer of at least ``n`` bytes
    (a free one whose size is ``rounded(n)``, else a new one); ``give(buf, done)`` returns it
    once ``done()`` is true (the copy out of it finished: a CUDA event's ``query``)."""

    def __init__(self, register: Register | None = None,
                 unregister: Callable[[int], None] | None = None) -> None:
        self.register = register or cuda_register
        self.unregister = unregister or cuda_unregister
        self._free: list[torch.Tensor] = []
        self._busy: list[tuple[torch.Tensor, Callable[[], bool]]] = []
        self._all: list[torch.Tensor] = []

    @property
    def pinned_bytes(self) -> int:
        return sum(b.numel() for b in self._all)

    def take(self, nbytes: int) -> torch.Tensor:
        self._collect()
        size = rounded(nbytes)
        for i, buf in enumerate(self._free):
            if buf.numel() == size:
                return self._free.pop(i)
        buf = torch.empty(size, dtype=torch.uint8)
        self.register(buf.data_ptr(), size)
        self._all.append(buf)
        return buf

    def give(self, buf: torch.Tensor, done: Callable[[], bool] | None = None) -> None:
        self._busy.append((buf, done or (lambda: True)))

    def _collect(self) -> None:
        still = []
        for buf, done in self._busy:
            if done():
                self._free.append(buf)
            else:
                still.append((buf, done))
        self._busy = still

    def release(self) -> None:
        """Unregister every buffer (the caller guarantees no copy out of them is in flight)."""
        for buf in self._all:
            self.unregister(buf.data_ptr())
        self._all, self._free, self._busy = [], [], []


def flat_layout(tensors: list[torch.Tensor], align: int = 64) -> tuple[list[int], int]:
    """Byte offsets of ``tensors`` packed into one buffer (each aligned), and its size: one
    registration for a whole state dict instead of one per tensor."""
    offsets, n = [], 0
    for t in tensors:
        offsets.append(n)
        n += -(-t.numel() * t.element_size() // align) * align
    return offsets, n


def views(buf: torch.Tensor, tensors: list[torch.Tensor], offsets: list[int]) -> list[Any]:
    """``tensors``' shapes and dtypes as views into ``buf`` at ``offsets``."""
    out = []
    for t, off in zip(tensors, offsets):
        nbytes = t.numel() * t.element_size()
        out.append(buf[off:off + nbytes].view(t.dtype).view(t.shape))
    return out
