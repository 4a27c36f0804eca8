"""Helpers for tests and tools that need weights without downloading any.

SAM's own initialisation leaves ``pos_embed`` and every ``rel_pos_*`` at zero, which would let
relative-position and padding bugs pass unnoticed; ``randomize_`` fills them (and the fusion
scales, on request) so parity tests can fail.
"""
from __future__ import annotations

import os

import torch

from .build_blsam import build_vanilla_sam
from .utils.images import PIXEL_MEAN, PIXEL_STD, real_photo  # noqa: F401  (real_photo: re-export)


@torch.no_grad()
def randomize_(
    model: torch.nn.Module, seed: int = 0, fusion: bool = False, positions: bool = True
) -> torch.nn.Module:
    """Give zero-initialised parameters random values.

    positions: SAM's ``pos_embed``/``rel_pos_*`` (E-blocks excluded); fusion: alpha, gamma and
    the E-blocks' zero-initialised output projections and position tables.
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        is_pos = "rel_pos" in name or name.endswith("pos_embed")
        if is_pos and "e_block" not in name:
            if positions:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        elif fusion and is_pos:
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        elif fusion and ("alpha" in name or "gamma" in name):
            p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.1)
        elif fusion and (".attn.proj." in name or ".lin_out." in name) and "e_block" in name:
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def save_random_sam_checkpoint(
    variant: str, path: str | os.PathLike, seed: int = 0, img_size: int = 1024
) -> str:
    """Write a randomly initialised SAM state dict with SAM's key names (a stand-in for
    ``sam_vit_b_01ec64.pth`` etc.) and return its path."""
    torch.manual_seed(seed)
    sam = build_vanilla_sam(variant, img_size=img_size)
    randomize_(sam, seed)
    torch.save(sam.state_dict(), os.fspath(path))
    return os.fspath(path)


def sam_with_meta_encoder(name: str, **kwargs) -> torch.nn.Module:
    """A registry model whose image encoder lives on the meta device (no memory, no init time:
    full-width structure and FLOP tests); the small prompt encoder and mask decoder get random
    CPU weights so FLOP counting can run them."""
    from .build_blsam import blsam_model_registry

    with torch.device("meta"):
        sam = blsam_model_registry[name](**kwargs)
    g = torch.Generator().manual_seed(0)
    for part in (sam.prompt_encoder, sam.mask_decoder):
        part.to_empty(device="cpu")
        with torch.no_grad():
            for t in list(part.parameters()) + list(part.buffers()):
                t.copy_(torch.randn(t.shape, generator=g) * 0.02)
    sam.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(-1, 1, 1), False)
    sam.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(-1, 1, 1), False)
    return sam


def assert_gradient_reaches_every_parameter(encoder: torch.nn.Module, x: torch.Tensor) -> None:
    """Backward through ``encoder(x)`` with a random projection: every parameter gets a finite
    gradient, and the bLViT-only parts (predictors, alpha, gamma, E-blocks) a nonzero one."""
    feats = encoder(x)
    (feats * torch.randn_like(feats)).sum().backward()
    for n, p in encoder.named_parameters():
        assert p.grad is not None, f"no gradient for {n}"
        assert torch.isfinite(p.grad).all(), f"non-finite gradient for {n}"
        if any(t in n for t in ("predictors", "alpha", "gamma", "e_block")):
            assert p.grad.abs().sum() > 0, f"zero gradient for {n}"
