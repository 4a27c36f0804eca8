"""FLOP counting in two conventions; the encoder runs on the meta device (no compute).

Both conventions count multiply-accumulates (MACs) and call them "FLOPs", as the paper does.

``"paper"``: the bLViT/SAM papers' convention. Their ViT-B SAM (372.0) and ViT-H SAM (2736.6)
numbers are reproduced exactly by the counting rules of ``thop`` (pytorch-OpCounter) applied to
the whole SAM with one point prompt: ``nn.Linear`` = output elements x in_features,
``nn.Conv2d``/``nn.ConvTranspose2d`` = output elements x in_channels/groups x kernel area (for
the transposed convolutions of the mask decoder this overcounts 4x, which is the convention),
affine ``nn.LayerNorm`` = 4 x elements; everything else (attention matmuls, GELU, SAM's custom
``LayerNorm2d``) is free. So it shows the projection/MLP cost that token routing cuts, but not
attention.

``"full"``: every matmul-like op the model really runs (linear, conv, attention QK^T and AV,
the relative-position products), from ``torch.utils.flop_counter.FlopCounterMode``. On the
meta device ``scaled_dot_product_attention`` decomposes into matmuls, so fused attention is
counted like SAM's explicit one. Use this one to predict wall-clock cost.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

CONVENTIONS = ("paper", "full")
PARTS = ("sam", "image_encoder")


@dataclass
class FlopReport:
    """GFLOPs (GMACs) of one model: ``total`` and per SAM part."""

    convention: str
    total: float
    by_part: dict[str, float] = field(default_factory=dict)


def _meta_like(module: nn.Module) -> dict[str, torch.Tensor]:
    tensors = dict(module.named_parameters())
    tensors.update(dict(module.named_buffers()))
    return {k: torch.empty_like(v, device="meta") for k, v in tensors.items()}


def _paper_macs(module: nn.Module, out: torch.Tensor) -> int:
    if isinstance(module, nn.Linear):
        return out.numel() * module.in_features
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        k = module.kernel_size[0] * module.kernel_size[1]
        return out.numel() * (module.in_channels // module.groups) * k
    if isinstance(module, nn.LayerNorm):
        return out.numel() * (4 if module.elementwise_affine else 2)
    return 0


class _Counter:
    """Accumulates MACs per SAM part; one context per convention."""

    def __init__(self, sam: nn.Module, convention: str) -> None:
        if convention not in CONVENTIONS:
            raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
        self.sam, self.convention, self.by_part = sam, convention, {}
        self._handles: list = []
        self._mode: FlopCounterMode | None = None

    def __enter__(self) -> _Counter:
        if self.convention == "paper":
            def hook(m: nn.Module, _inp: tuple, out: torch.Tensor) -> None:
                self._paper += _paper_macs(m, out)

            self._paper = 0
            for m in self.sam.modules():
                if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d, nn.LayerNorm)):
                    self._handles.append(m.register_forward_hook(hook))
        return self

    def part(self, name: str) -> _Part:
        return _Part(self, name)

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()


class _Part:
    def __init__(self, counter: _Counter, name: str) -> None:
        self.c, self.name = counter, name

    def __enter__(self) -> None:
        if self.c.convention == "paper":
            self.start = self.c._paper
        else:
            self.mode = FlopCounterMode(display=False)
            self.mode.__enter__()

    def __exit__(self, *exc) -> None:
        if self.c.convention == "paper":
            macs = self.c._paper - self.start
        else:
            self.mode.__exit__(*exc)
            macs = self.mode.get_total_flops() // 2  # FlopCounterMode counts 2 per MAC
        self.c.by_part[self.name] = self.c.by_part.get(self.name, 0) + macs


def _countable_attention(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """On a real device, SDPA through its math backend (matmuls FlopCounterMode sees; fused CPU
    kernels have no FLOP formula and would count as zero). Meta runs decompose anyway."""
    if x.device.type == "meta":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


@torch.no_grad()
def count_flops(
    sam: nn.Module,
    convention: str = "paper",
    part: str = "sam",
    batch_size: int = 1,
    images: torch.Tensor | None = None,
) -> FlopReport:
    """Count GFLOPs of ``sam`` (a ``segment_anything`` ``Sam``) at its encoder's ``img_size``.

    ``part="sam"``: image encoder + prompt encoder + mask decoder for one point prompt with
    multimask output (what ``SamPredictor.predict`` runs); ``"image_encoder"``: the encoder only.
    The encoder runs on the meta device (instant even for ViT-H) and the prompt encoder and
    decoder on copies: ``sam`` is left exactly as it was found (parameters, ``requires_grad``,
    the encoder's ``last_routing``).

    The meta run cannot see image content, so for an encoder with ``skip_padding`` it counts
    the paper's routing. ``images`` (B, 3, S, S), SAM-preprocessed (zero padding included):
    the encoder runs for real on them (``batch_size`` is then B), which counts what
    padding-aware routing does on exactly those images.
    """
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    enc = sam.image_encoder
    size = enc.img_size
    if images is None:
        x, weights = torch.empty(batch_size, 3, size, size, device="meta"), _meta_like(enc)
    else:
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise ValueError(f"images must be (B, 3, {size}, {size}), got {tuple(images.shape)}")
        if batch_size not in (1, images.shape[0]):  # 1: the default, i.e. not given
            raise ValueError(f"batch_size {batch_size} contradicts the {images.shape[0]} images "
                             "given; leave it out when passing images")
        x, batch_size = images, images.shape[0]
        weights = {k: v.detach() for k, v in list(enc.named_parameters())
                   + list(enc.named_buffers())}
    # the prompt encoder and decoder run for real on detached copies: FlopCounterMode's module
    # tracker trips over views of trainable parameters made under no_grad, and switching
    # requires_grad off and on again on the caller's model is a change others could observe
    small = nn.ModuleDict({"pe": sam.prompt_encoder, "md": sam.mask_decoder})
    small = copy.deepcopy(small).requires_grad_(False) if part == "sam" else None
    counted = nn.ModuleDict({"enc": enc, **(dict(small) if small is not None else {})})
    saved = dict(vars(enc))  # the forward records e.g. ``last_routing``; it must not stay meta
    try:
        with _Counter(counted, convention) as counter:
            with counter.part("image_encoder"), _countable_attention(x):
                emb = functional_call(enc, weights, (x,))
            if small is not None:
                # small and index by label values (no meta kernel): real zero embedding
                pe, md = small["pe"], small["md"]
                dev = next(md.parameters()).device
                dt = next(md.parameters()).dtype
                emb = torch.zeros((1, *emb.shape[1:]), device=dev, dtype=dt)
                coords = torch.full((1, 1, 2), size / 2, device=dev)
                labels = torch.ones(1, 1, dtype=torch.int, device=dev)
                for _ in range(batch_size):  # SAM's decoder takes one image per call
                    with counter.part("prompt_encoder"):
                        sparse, dense = pe(points=(coords, labels), boxes=None, masks=None)
                        dense_pe = pe.get_dense_pe()
                    with counter.part("mask_decoder"):
                        md(image_embeddings=emb, image_pe=dense_pe,
                           sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                           multimask_output=True)
    finally:
        for k in [k for k in vars(enc) if k not in saved]:
            delattr(enc, k)
        vars(enc).update(saved)
    by_part = {k: v / 1e9 for k, v in counter.by_part.items()}
    return FlopReport(convention, sum(by_part.values()), by_part)


def count_gflops(
    sam: nn.Module,
    convention: str = "paper",
    part: str = "sam",
    batch_size: int = 1,
    images: torch.Tensor | None = None,
) -> float:
    """Total GFLOPs (GMACs) of ``sam``; see ``count_flops``."""
    return count_flops(sam, convention, part, batch_size, images).total
