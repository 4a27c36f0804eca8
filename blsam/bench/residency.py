"""How many benchmark workers may be resident on a GPU at once.

Why: every timed model lives in a persistent worker process of its own, so the round-robin
schedule can alternate them without rebuilding. On a CPU node that costs host memory only; on a
GPU every worker holds a CUDA context, its weights and its peak activations on the same device:
``--families h --devices cuda`` with every dtype and batch size was 28 workers, about 74 GiB of
fp32 weights plus contexts, out of memory on an 80 GB card. So CUDA rows run in *waves*: the
rows that are compared with each other (one family, dtype and batch size: the official encoder,
the fused one, the students and baselines) share a wave whenever they fit in one together, and
a wave holds as many such groups as fit in 90% of the device's memory, estimated from the
models' parameter counts on the meta device and the attention shapes of the family's ViT.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from blsam.build_blsam import build_vanilla_sam
from blsam.specs import FAMILIES

from .models import BenchModel

T = TypeVar("T")

CONTEXT_BYTES = 768 << 20  # CUDA context, cuBLAS / cuDNN workspaces: per worker process
USABLE = 0.9  # of the device's total memory (fragmentation, the driver's own)
ELEMENT = {"fp32": 4, "bf16": 2, "fp16": 2, "autocast": 2}


@functools.cache
def vit_shape(family: str, img_size: int) -> tuple[int, int, int]:
    """(tokens, embedding dim, heads) of the family's vanilla ViT, from a meta-device build."""
    with torch.device("meta"):
        enc = build_vanilla_sam(FAMILIES[family][0], img_size=img_size).image_encoder
    dim = enc.patch_embed.proj.out_channels
    return (img_size // 16) ** 2, dim, enc.blocks[0].attn.num_heads


def parameter_count(spec: BenchModel, img_size: int) -> int:
    return _parameter_count(spec.family, spec.kind, spec.registry, spec.keep_ratio, img_size)


@functools.cache
def _parameter_count(family: str, kind: str, registry: str | None, keep_ratio: float | None,
                     img_size: int) -> int:
    spec = BenchModel("count", family, kind, keep_ratio, registry=registry)
    with torch.device("meta"):
        enc = spec.build(img_size).image_encoder
    return sum(p.numel() for p in enc.parameters())


def resident_bytes(spec: BenchModel, img_size: int, dtype: str, batch: int) -> int:
    """A worker's device memory: context + weights + the forward's peak activations. The peak
    is a global-attention layer: the official encoder materialises its (B*heads, N, N) scores
    about three times (scores, with relative positions, softmax); SDPA with SAM's additive
    bias holds the bias and one workspace of that size; plus the MLP's 4x-wide activations."""
    n, dim, heads = vit_shape(spec.family, img_size)
    elt = ELEMENT[dtype]
    weights = parameter_count(spec, img_size) * (4 if dtype in ("fp32", "autocast") else 2)
    if dtype == "autocast":
        weights += weights // 2  # the bf16 copies autocast caches of the fp32 weights
    scores = batch * heads * n * n * elt * (3 if spec.kind == "official" else 2)
    tokens = batch * n * dim * elt * 8
    return CONTEXT_BYTES + weights + scores + tokens


def gpu_waves(items: Sequence[T], need: Callable[[T], int], group: Callable[[T], object],
              capacity: int) -> tuple[list[list[T]], list[tuple[T, int]]]:
    """Groups packed in order into waves of at most ``USABLE * capacity`` bytes, a group
    whole whenever it fits in one wave (its rows are then interleaved with each other); a
    group too big for one wave is spread over consecutive waves in its order (the official
    encoder first). Returns (waves, too_big): an item that does not fit even alone, with its
    bytes."""
    limit = int(USABLE * capacity)
    groups: dict[object, list[T]] = {}
    for it in items:
        groups.setdefault(group(it), []).append(it)
    waves: list[list[T]] = []
    used = 0
    too_big: list[tuple[T, int]] = []

    def place(chunk: list[T], size: int) -> None:
        nonlocal used
        if not waves or used + size > limit:
            waves.append([])
            used = 0
        waves[-1].extend(chunk)
        used += size

    for members in groups.values():
        size = sum(need(m) for m in members)
        if size <= limit:
            place(members, size)
            continue
        for m in members:
            if need(m) > limit:
                too_big.append((m, need(m)))
            else:
                place([m], need(m))
    return waves, too_big
