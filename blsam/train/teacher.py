"""The distillation teacher: vanilla SAM's image encoder, or its cached embeddings.

The teacher runs our fused-attention encoder (``build_vanilla_sam(fused=True)``: SAM's weights
and names, SDPA instead of a materialised attention matrix, 0.61x the official encoder's CPU
latency, cos-sim >= 0.9999 to it in fp32), in inference mode, under bf16 autocast on GPU only
(the CPU has no fast bf16 path worth the error), optionally through ``torch.compile``.

Cached embeddings come from a packed cache (``packed_cache.py``, written by
``tools/cache_teacher.py``) that records the sha256 of the teacher checkpoint and the image
size; a cache made by another teacher or for another size is refused. The cache is only valid
because training uses no image augmentation.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..build_blsam import build_vanilla_sam
from .packed_cache import CacheError, PackedCache, check_provenance, provenance, verify_parts

__all__ = ["Teacher", "check_cache", "cache_covers", "CacheError"]


def check_cache(cache_dir: str, teacher: str, img_size: int,
                sam_checkpoint: str | None = None) -> None:
    """Refuse a cache made for another teacher (checkpoint hash), variant or image size, or
    whose parts fail their size / sha256 check (``verify_parts``).

    ``sam_checkpoint`` None skips only the hash check (callers that have no file at hand)."""
    if sam_checkpoint is None:
        index = PackedCache(cache_dir).index
        if index.get("teacher") != teacher or int(index.get("img_size", -1)) != img_size:
            raise CacheError(f"--teacher-cache {cache_dir!r} was made with teacher="
                             f"{index.get('teacher')!r}, img_size={index.get('img_size')!r}; "
                             f"this run needs teacher={teacher!r}, img_size={img_size}")
        verify_parts(cache_dir, index)
        return
    check_provenance(cache_dir, provenance(teacher, sam_checkpoint, img_size))


def cache_covers(cache_dir: str | None, keys: Sequence[str]) -> bool:
    """Whether the cache holds every key (a lookup in its index: no file is touched)."""
    return bool(cache_dir) and PackedCache(cache_dir).covers(keys)


class Teacher:
    """Frozen fused SAM image encoder, built on first use (never, if the cache covers every
    image). ``amp_dtype`` applies on CUDA only; ``compile`` wraps the encoder in
    ``torch.compile`` (first call slow, then faster on GPU)."""

    def __init__(self, variant: str, sam_checkpoint: str | None, img_size: int,
                 device: torch.device, amp_dtype: torch.dtype | None = None,
                 compile: bool = False) -> None:
        self.variant, self.sam_checkpoint, self.img_size = variant, sam_checkpoint, img_size
        self.device = device
        self.amp_dtype = amp_dtype if device.type == "cuda" else None
        self.compile = compile
        self.encoder: torch.nn.Module | None = None
        self._run: torch.nn.Module | None = None
        self.images_computed = 0

    def build(self) -> torch.nn.Module:
        if self.encoder is None:
            sam = build_vanilla_sam(self.variant, self.sam_checkpoint, img_size=self.img_size,
                                    fused=True)
            self.encoder = sam.image_encoder.to(self.device).eval().requires_grad_(False)
            self._run = torch.compile(self.encoder) if self.compile else self.encoder
        return self.encoder

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 256, S/16, S/16) fp32, a normal tensor (usable as a loss target)."""
        self.build()
        with torch.inference_mode(), torch.autocast(
                self.device.type, dtype=self.amp_dtype or torch.float32,
                enabled=self.amp_dtype is not None):
            out = self._run(images.to(self.device, non_blocking=True)).float()
        self.images_computed += images.shape[0]
        return out.clone()  # outside inference mode: autograd may save it for backward

    def embeddings(self, images: torch.Tensor, cached: list[torch.Tensor | None]
                   ) -> torch.Tensor:
        """(B, 256, h, w) fp32 targets: cached entries where present, the encoder for the rest.

        Cached rows travel to the device as one stacked fp16 tensor (one transfer per batch,
        non-blocking from pinned memory on CUDA) and become fp32 there. A partly cached batch
        is split and merged with device index tensors (also sent non-blocking): indexing a
        CUDA tensor with a Python list copies the list from pageable memory, a host sync."""
        have = [i for i, c in enumerate(cached) if c is not None]
        missing = [i for i, c in enumerate(cached) if c is None]
        if not missing:
            return _to_device(torch.stack(cached), self.device).float()  # type: ignore[arg-type]
        if not have:
            return self.encode(images)
        idx = _to_device(torch.tensor(missing + have), self.device)
        miss_idx, have_idx = idx[:len(missing)], idx[len(missing):]
        sel = miss_idx if images.device == miss_idx.device else torch.tensor(missing)
        computed = self.encode(images.index_select(0, sel))
        out = torch.empty((len(cached), *computed.shape[1:]), device=self.device)
        out.index_copy_(0, miss_idx, computed)
        out.index_copy_(0, have_idx, _to_device(torch.stack([cached[i] for i in have]),
                                                self.device).float())
        return out


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    if x.device == device:
        return x
    if device.type == "cuda" and not x.is_pinned():
        x = x.pin_memory()
    return x.to(device, non_blocking=True)
