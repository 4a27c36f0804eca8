"""Host-to-device traffic of the training loop: one loader for the whole run, one transfer per
batch.

* ``endless_loader``: a single DataLoader whose batch sampler runs on from a data position
  through every later epoch, so workers start once (they are never rebuilt per epoch) and keep
  prefetching across epoch boundaries. Samples are functions of (seed, epoch, index), not of
  worker state, so a resumed run still sees exactly the batches the uninterrupted one saw.
* ``pack_batch`` / ``unpack_batch``: every tensor of a batch (images, masks, boxes, points,
  labels, cached teacher rows) is packed into one byte buffer by the loader worker, staged into
  a reused page-locked buffer of its size (``blsam.train.pinned``), copied to the GPU with one
  non-blocking transfer and viewed apart there. CPU runs skip the packing (nothing to
  transfer).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .pinned import PinnedPool, flat_layout

ALIGN = 64  # bytes: every piece starts aligned for any dtype's view


class EndlessBatchSampler(torch.utils.data.Sampler):
    """Batches of an epoch batch sampler (``set_position(epoch, start)`` + iteration, like
    ``data.EpochBatchSampler``) from (epoch, start_batch) on, epoch after epoch."""

    def __init__(self, sampler: Any, epoch: int, start_batch: int) -> None:
        self.sampler, self.epoch, self.start_batch = sampler, epoch, start_batch

    def positions(self) -> Iterator[tuple[int, int]]:
        """(epoch, batch index) of each batch ``__iter__`` yields, in the same order."""
        epoch, start = self.epoch, self.start_batch
        while True:
            for b in range(start, len(self.sampler)):
                yield epoch, b
            epoch, start = epoch + 1, 0

    def __iter__(self) -> Iterator[list[Any]]:
        epoch, start = self.epoch, self.start_batch
        while True:
            self.sampler.set_position(epoch, start)
            yield from iter(self.sampler)
            epoch, start = epoch + 1, 0


@contextlib.contextmanager
def one_opencv_thread_in_workers() -> Iterator[None]:
    """Start DataLoader workers (``iter(loader)``) inside this block: they run OpenCV on one
    thread. torch limits its own pool in workers; OpenCV would start one thread per core in
    each of N workers, N x cores threads fighting the training process for the node's CPUs.

    Why not a ``worker_init_fn`` calling ``cv2.setNumThreads(1)``: in a forked worker whose
    parent had already used OpenCV's pool, that call never returns (measured: a deadlock), so
    the parent's setting is lowered while the workers fork and restored after."""
    try:
        import cv2
    except ImportError:
        yield
        return
    before = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(before)


def endless_loader(ds: torch.utils.data.Dataset, sampler: Any, collate_fn: Any,
                   num_workers: int, epoch: int, start_batch: int, pin: bool
                   ) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """Endless (epoch, batch index, batch) from a data position, one DataLoader for the run.

    ``pin`` (CUDA runs): batches come packed (``pack_batch``) and pinned; pass each through
    ``unpack_batch(batch, device)``."""
    endless = EndlessBatchSampler(sampler, epoch, start_batch)
    loader = torch.utils.data.DataLoader(
        ds, batch_sampler=endless, collate_fn=PackingCollate(collate_fn) if pin else collate_fn,
        num_workers=num_workers,
        pin_memory=False,  # unpack_batch stages into exact-size pinned buffers (pinned.py)
        persistent_workers=num_workers > 0,
        prefetch_factor=2 if num_workers > 0 else None)
    with one_opencv_thread_in_workers():  # the workers fork here
        batches = iter(loader)
    for (e, b), batch in zip(endless.positions(), batches):
        yield e, b, batch


def _tensors(obj: Any, path: tuple[Any, ...], out: list[tuple[tuple[Any, ...], torch.Tensor]]
             ) -> None:
    if isinstance(obj, torch.Tensor):
        out.append((path, obj))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _tensors(v, path + (k,), out)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _tensors(v, path + (i,), out)


def _set(obj: Any, path: tuple[Any, ...], value: Any) -> None:
    for p in path[:-1]:
        obj = obj[p]
    obj[path[-1]] = value


PACKED = "_packed"


def pack_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """Move every tensor of ``batch`` into one flat uint8 buffer (``batch["_packed"]``), leaving
    None in its place. Runs in the loader workers, so the main process only stages it into a
    pinned buffer and copies one tensor (``unpack_batch``)."""
    found: list[tuple[tuple[Any, ...], torch.Tensor]] = []
    _tensors(batch, (), found)
    offsets, n = flat_layout([t for _, t in found], ALIGN)
    specs = [(path, t.dtype, tuple(t.shape), off) for (path, t), off in zip(found, offsets)]
    flat = torch.empty(n, dtype=torch.uint8)
    for (path, t), (_, _, _, off) in zip(found, specs):
        nbytes = t.numel() * t.element_size()
        if nbytes:
            flat[off:off + nbytes].copy_(t.contiguous().view(-1).view(torch.uint8))
        _set(batch, path, None)
    batch[PACKED] = {"flat": flat, "specs": specs}
    return batch


def unpack_batch(batch: dict[str, Any], device: torch.device,
                 pool: PinnedPool | None = None) -> dict[str, Any]:
    """Inverse of ``pack_batch`` with ONE (non-blocking, from pinned memory) copy to ``device``;
    a batch that was not packed is returned as is. ``pool``: stage through its exact-size
    page-locked buffers (the loop's, on CUDA) instead of torch's power-of-two pinned blocks."""
    packed = batch.pop(PACKED, None)
    if packed is None:
        return batch
    flat = packed["flat"]
    if pool is not None:
        flat = stage_and_copy(flat, device, pool)
    else:
        if device.type == "cuda" and not flat.is_pinned():
            flat = flat.pin_memory()
        flat = flat.to(device, non_blocking=True)
    for path, dtype, shape, off in packed["specs"]:
        nbytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        _set(batch, path, flat[off:off + nbytes].view(dtype).view(shape))
    return batch


def stage_and_copy(flat: torch.Tensor, device: torch.device, pool: PinnedPool
                   ) -> torch.Tensor:
    """``flat`` through a pooled pinned buffer to ``device`` (non-blocking); the buffer goes
    back to the pool once the copy out of it is done."""
    buf = pool.take(flat.numel())
    staged = buf[:flat.numel()]
    staged.copy_(flat)
    out = staged.to(device, non_blocking=True)
    if out.data_ptr() == staged.data_ptr():  # already there: no copy, so not the pool's
        out = out.clone()
    pool.give(buf, copy_done(device))
    return out


def copy_done(device: torch.device) -> Callable[[], bool]:
    """True once the host-to-device copies issued so far have finished."""
    if device.type != "cuda":
        return lambda: True
    event = torch.cuda.Event()
    event.record()
    return event.query


class PackingCollate:
    """``collate_fn`` then ``pack_batch`` (a class, so spawned workers can pickle it)."""

    def __init__(self, collate_fn: Any) -> None:
        self.collate_fn = collate_fn

    def __call__(self, samples: list[Any]) -> dict[str, Any]:
        return pack_batch(self.collate_fn(samples))


def normalize_images(images: torch.Tensor, hw: list[tuple[int, int]]) -> torch.Tensor:
    """Batch images as the models want them: uint8 ones are normalised where they are (with
    SAM's mean/std, padding at 0); float ones are returned as they are."""
    if images.dtype != torch.uint8:
        return images
    mean, std = pixel_stats(images.device)
    return normalize_on_device(images, hw, mean, std)


_STATS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def pixel_stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's pixel mean/std, copied to ``device`` once per process (was a pageable host copy,
    i.e. a host sync on CUDA, every step)."""
    if device not in _STATS:
        from ..utils.images import PIXEL_MEAN, PIXEL_STD

        _STATS[device] = (torch.tensor(PIXEL_MEAN).to(device), torch.tensor(PIXEL_STD).to(device))
    return _STATS[device]


def normalize_on_device(images: torch.Tensor, hw: list[tuple[int, int]], mean: torch.Tensor,
                        std: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, S, S) images, resized and zero-padded on the host, -> SAM-normalised fp32
    with the padding at 0 (SAM pads after normalising), computed where ``images`` lives.

    Bitwise equal to normalising on the host in fp32 ((x - mean) / std), so a teacher cache
    made either way still matches."""
    x = (images.float() - mean.view(1, 3, 1, 1).to(images.device)) / std.view(
        1, 3, 1, 1).to(images.device)
    s = images.shape[-1]
    rows = torch.arange(s, device=images.device)
    sizes = torch.tensor([[v[0], v[1]] for v in hw])
    if images.is_cuda:  # pinned + non-blocking: no host sync per batch
        sizes = sizes.pin_memory()
    sizes = sizes.to(images.device, non_blocking=True)
    h, w = sizes[:, 0].view(-1, 1, 1, 1), sizes[:, 1].view(-1, 1, 1, 1)
    keep = (rows.view(1, 1, s, 1) < h) & (rows.view(1, 1, 1, s) < w)
    return torch.where(keep, x, torch.zeros((), device=x.device))
