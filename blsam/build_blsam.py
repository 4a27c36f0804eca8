"""Model registry: bLViT-SAM (``b_t``, ``h_b``) and vanilla SAM (``vit_b``, ``vit_l``, ``vit_h``).

Every builder has the same signature, so scripts compare models with one flag::

    sam = blsam_model_registry["b_t"](sam_checkpoint="sam_vit_b_01ec64.pth")
    sam = blsam_model_registry["b_t"](checkpoint="blsam_b_t.pth")
    sam = blsam_model_registry["vit_b"](checkpoint="sam_vit_b_01ec64.pth")

and each returns an unmodified ``segment_anything.modeling.Sam``.
"""
from __future__ import annotations

import os
from functools import partial
from typing import Callable, Dict, Optional

import torch
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

from .checkpoint import (
    SAM_ENCODER_NAMES,
    CheckpointError,
    adapt_sam_state_dict,
    check_not_blsam,
    describe_sam_encoder,
    load_strict,
    read_state_dict,
)
from .modeling import BLViTImageEncoder, EncoderSpec

PathLike = Optional[os.PathLike | str]

VIT_CONFIGS = {  # embed_dim, depth, heads, global attention blocks (SAM's)
    "vit_b": (768, 12, 12, (2, 5, 8, 11)),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": (1280, 32, 16, (7, 15, 23, 31)),
}


def _b_t_spec() -> EncoderSpec:
    dim, depth, heads, glob = VIT_CONFIGS["vit_b"]
    return EncoderSpec(
        embed_dim=dim, depth=depth, num_heads=heads, global_attn_indexes=glob,
        layer_modes=("full",) + ("big_little",) * 11,
        predictor_after=(0, 3, 6, 9),  # after layers 1, 4, 7, 10
        e_dim=192, e_heads=3, name="b_t",
    )


def _h_b_spec() -> EncoderSpec:
    dim, depth, heads, glob = VIT_CONFIGS["vit_h"]
    # layers 1-9 full; from layer 10 big.LITTLE on even layers, P-only on odd layers
    modes = tuple(
        "full" if i < 9 else ("big_little" if (i + 1) % 2 == 0 else "p_only") for i in range(depth)
    )
    return EncoderSpec(
        embed_dim=dim, depth=depth, num_heads=heads, global_attn_indexes=glob,
        layer_modes=modes,
        predictor_after=(7, 15, 23),  # after layers 8, 16, 24
        e_dim=768, e_heads=12, name="h_b",
    )


def dense_spec(variant: str) -> EncoderSpec:
    """A vanilla SAM ViT as an ``EncoderSpec``: our fused-attention version of ``variant``."""
    dim, depth, heads, glob = VIT_CONFIGS[variant]
    return EncoderSpec(dim, depth, heads, glob, ("full",) * depth, name=f"{variant}_sdpa")


BLSAM_SPECS: Dict[str, Callable[[], EncoderSpec]] = {"b_t": _b_t_spec, "h_b": _h_b_spec}
TEACHER_OF = {"b_t": "vit_b", "h_b": "vit_h"}  # the SAM whose blocks initialise the P-blocks


def _sam_with_encoder(image_encoder: torch.nn.Module, img_size: int) -> Sam:
    prompt_embed_dim = 256
    grid = img_size // 16
    sam = Sam(
        image_encoder=image_encoder,
        prompt_encoder=PromptEncoder(
            embed_dim=prompt_embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(img_size, img_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=2, embedding_dim=prompt_embed_dim, mlp_dim=2048, num_heads=8
            ),
            transformer_dim=prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    sam.eval()
    return sam


def _check_sam_variant(state_dict: Dict[str, torch.Tensor], variant: str, path: str) -> None:
    check_not_blsam(state_dict, path)
    found = describe_sam_encoder(state_dict)
    if found is None:
        raise CheckpointError(
            f"{path!r} is not a SAM checkpoint: no 'image_encoder.patch_embed.proj.weight' key"
        )
    dim, depth, _, _ = VIT_CONFIGS[variant]
    if found != (dim, depth):
        name = SAM_ENCODER_NAMES.get(found, f"embed dim {found[0]}, {found[1]} blocks")
        want = SAM_ENCODER_NAMES[(dim, depth)]
        raise CheckpointError(
            f"{path!r} holds a SAM {name} image encoder, but this model needs SAM {want} "
            f"(embed dim {dim}, {depth} blocks)"
        )


def _load_checkpoint(sam: Sam, path: str, what: str) -> None:
    sd = read_state_dict(path, what)
    load_strict(sam, adapt_sam_state_dict(sd, sam.state_dict()), f"{what} {path!r}")


def build_vanilla_sam(
    variant: str,
    checkpoint: PathLike = None,
    *,
    sam_checkpoint: PathLike = None,
    keep_ratio: float = 0.25,
    img_size: int = 1024,
    fused: bool = False,
    skip_padding: bool = False,
) -> Sam:
    """Vanilla SAM; ``fused=True`` swaps in our SDPA encoder (same weights, same names)."""
    # vanilla SAM routes nothing; accepted so every builder is interchangeable
    del keep_ratio, skip_padding
    dim, depth, heads, glob = VIT_CONFIGS[variant]
    if fused:
        encoder: torch.nn.Module = BLViTImageEncoder(dense_spec(variant), img_size=img_size)
    else:
        encoder = ImageEncoderViT(
            depth=depth, embed_dim=dim, img_size=img_size, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=heads, patch_size=16,
            qkv_bias=True, use_rel_pos=True, global_attn_indexes=glob, window_size=14,
            out_chans=256,
        )
    sam = _sam_with_encoder(encoder, img_size)
    if checkpoint is not None and sam_checkpoint is not None:
        raise ValueError("give either checkpoint or sam_checkpoint, not both")
    path = checkpoint if checkpoint is not None else sam_checkpoint
    if path is not None:
        sd = read_state_dict(path, "SAM checkpoint")
        _check_sam_variant(sd, variant, os.fspath(path))
        load_strict(sam, adapt_sam_state_dict(sd, sam.state_dict()), f"SAM checkpoint {path!r}")
    return sam


def load_sam_into_blsam(sam: Sam, path: PathLike, variant: str) -> None:
    """Initialise a bLViT-SAM from an official SAM checkpoint (P-blocks, embeddings, neck,
    prompt encoder, mask decoder); E-blocks, predictors, alpha and gamma keep their init."""
    path = os.fspath(path)
    sd = read_state_dict(path, "SAM checkpoint")
    _check_sam_variant(sd, variant, path)
    own = sam.state_dict()
    sd = adapt_sam_state_dict(sd, own)
    unexpected = sorted(k for k in sd if k not in own)
    if unexpected:
        raise CheckpointError(f"SAM checkpoint {path!r} has keys this model lacks: {unexpected[:20]}")
    fresh = ("e_block.", "predictors.", "alpha_", "gamma_")
    missing = sorted(k for k in own if k not in sd and not any(f in k for f in fresh))
    if missing:
        raise CheckpointError(f"SAM checkpoint {path!r} misses keys: {missing[:20]}")
    bad = [k for k in sd if sd[k].shape != own[k].shape]
    if bad:
        raise CheckpointError(f"SAM checkpoint {path!r} has wrong shapes for {bad[:20]}")
    sam.load_state_dict(sd, strict=False)


def build_blsam(
    variant: str,
    checkpoint: PathLike = None,
    *,
    sam_checkpoint: PathLike = None,
    keep_ratio: float = 0.25,
    img_size: int = 1024,
    skip_padding: bool = False,
) -> Sam:
    """bLViT-SAM. ``checkpoint``: a trained bLViT-SAM (strict); ``sam_checkpoint``: SAM init.

    ``skip_padding=True``: padding-aware routing (beyond the paper; see ``BLViTImageEncoder``).
    """
    encoder = BLViTImageEncoder(BLSAM_SPECS[variant](), img_size=img_size, keep_ratio=keep_ratio,
                                skip_padding=skip_padding)
    sam = _sam_with_encoder(encoder, img_size)
    if checkpoint is not None and sam_checkpoint is not None:
        raise ValueError("give either checkpoint (trained bLViT-SAM) or sam_checkpoint, not both")
    if sam_checkpoint is not None:
        load_sam_into_blsam(sam, sam_checkpoint, TEACHER_OF[variant])
    elif checkpoint is not None:
        sd = read_state_dict(checkpoint, "bLViT-SAM checkpoint")
        if describe_sam_encoder(sd) and not any(".e_block." in k for k in sd):
            raise CheckpointError(
                f"{os.fspath(checkpoint)!r} is a vanilla SAM checkpoint, not a bLViT-SAM one: "
                f"pass it as sam_checkpoint= to initialise the P-blocks from it"
            )
        load_strict(sam, adapt_sam_state_dict(sd, sam.state_dict()),
                    f"bLViT-SAM checkpoint {os.fspath(checkpoint)!r}")
    return sam


blsam_model_registry: Dict[str, Callable[..., Sam]] = {
    "b_t": partial(build_blsam, "b_t"),
    "h_b": partial(build_blsam, "h_b"),
    "vit_b": partial(build_vanilla_sam, "vit_b"),
    "vit_l": partial(build_vanilla_sam, "vit_l"),
    "vit_h": partial(build_vanilla_sam, "vit_h"),
}
blsam_model_registry["default"] = blsam_model_registry["h_b"]


def build_model(
    name: str,
    checkpoint: PathLike = None,
    sam_checkpoint: PathLike = None,
    keep_ratio: float = 0.25,
    img_size: int = 1024,
    skip_padding: bool = False,
) -> Sam:
    """Registry lookup for scripts with ``--model/--checkpoint/--sam-checkpoint`` flags.

    For vanilla SAM an official checkpoint may come through either flag (it is the same file).
    """
    if name not in blsam_model_registry:
        raise KeyError(f"unknown model {name!r}; choose from {sorted(blsam_model_registry)}")
    if name.startswith("vit_"):
        if checkpoint is not None and sam_checkpoint is not None:
            raise ValueError("vanilla SAM takes one checkpoint: give --checkpoint only")
        return blsam_model_registry[name](checkpoint if checkpoint is not None else sam_checkpoint,
                                          img_size=img_size)
    return blsam_model_registry[name](checkpoint, sam_checkpoint=sam_checkpoint,
                                      keep_ratio=keep_ratio, img_size=img_size,
                                      skip_padding=skip_padding)
