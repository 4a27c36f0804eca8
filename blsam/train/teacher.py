"""The distillation teacher: vanilla SAM's image encoder, or its cached embeddings.

Cache layout (written by ``tools/cache_teacher.py``): ``<dir>/sa_N.pt`` holding one fp16
(256, S/16, S/16) tensor each, plus ``<dir>/meta.json`` ({"teacher", "img_size"}) so a cache
made for another teacher or resolution is refused instead of silently distilling garbage.
The cache is only valid because training uses no image augmentation.
"""
from __future__ import annotations

import json
import os
from typing import List, Optional, Sequence

import torch

from ..build_blsam import blsam_model_registry

META = "meta.json"


def check_cache(cache_dir: str, teacher: str, img_size: int) -> None:
    """Refuse a cache made for another teacher or image size."""
    path = os.path.join(cache_dir, META)
    if not os.path.isfile(path):
        raise ValueError(f"--teacher-cache {cache_dir!r} has no {META}: not a teacher cache")
    with open(path, "r", encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("teacher") != teacher or int(meta.get("img_size", -1)) != img_size:
        raise ValueError(f"--teacher-cache {cache_dir!r} was made with {meta}, this run needs "
                         f"teacher={teacher!r}, img_size={img_size}")


def write_cache_meta(cache_dir: str, teacher: str, img_size: int) -> None:
    os.makedirs(cache_dir, exist_ok=True)
    with open(os.path.join(cache_dir, META), "w", encoding="utf-8") as f:
        json.dump({"teacher": teacher, "img_size": img_size}, f)


def cache_covers(cache_dir: Optional[str], keys: Sequence[str]) -> bool:
    return bool(cache_dir) and all(
        os.path.isfile(os.path.join(cache_dir, k + ".pt")) for k in keys)


class Teacher:
    """Frozen SAM image encoder in eval mode, built on first use (never, if the cache covers
    every image)."""

    def __init__(self, variant: str, sam_checkpoint: Optional[str], img_size: int,
                 device: torch.device, amp_dtype: Optional[torch.dtype] = None) -> None:
        self.variant, self.sam_checkpoint, self.img_size = variant, sam_checkpoint, img_size
        self.device, self.amp_dtype = device, amp_dtype
        self.encoder: Optional[torch.nn.Module] = None
        self.images_computed = 0

    def build(self) -> torch.nn.Module:
        if self.encoder is None:
            sam = blsam_model_registry[self.variant](checkpoint=self.sam_checkpoint,
                                                     img_size=self.img_size)
            self.encoder = sam.image_encoder.to(self.device).eval().requires_grad_(False)
        return self.encoder

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        enc = self.build()
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            out = enc(images.to(self.device))
        self.images_computed += images.shape[0]
        return out.float()

    def embeddings(self, images: torch.Tensor, cached: List[Optional[torch.Tensor]]
                   ) -> torch.Tensor:
        """(B, 256, h, w) fp32 targets: cached entries where present, the encoder for the rest."""
        missing = [i for i, c in enumerate(cached) if c is None]
        out: List[Optional[torch.Tensor]] = [
            None if c is None else c.to(self.device, torch.float32) for c in cached]
        if missing:
            computed = self.encode(images[missing])
            for j, i in enumerate(missing):
                out[i] = computed[j]
        return torch.stack(out)  # type: ignore[arg-type]
