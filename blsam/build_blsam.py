"""Model registry: bLViT-SAM (``b_t``, ``h_b``) and vanilla SAM (``vit_b``, ``vit_l``, ``vit_h``).

Every builder has the same signature, so scripts compare models with one flag::

    sam = blsam_model_registry["b_t"](sam_checkpoint="sam_vit_b_01ec64.pth")
    sam = blsam_model_registry["b_t"](checkpoint="blsam_b_t.pth")
    sam = blsam_model_registry["vit_b"](checkpoint="sam_vit_b_01ec64.pth")

and each returns an unmodified ``segment_anything.modeling.Sam``.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial
from typing import Optional, Union

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
from .modeling import BLViTImageEncoder
from .modeling.evit import EViTImageEncoder
from .modeling.evovit import EvoViTImageEncoder
from .specs import (
    DEFAULT_MODEL,
    MODEL_SPECS,
    TEACHER_OF,  # noqa: F401  (re-exported: older imports)
    check_img_size,
    check_keep_ratio,
    dense_spec,
    get_spec,
)
from .utils.images import PIXEL_MEAN, PIXEL_STD
from .weights import check_metadata

PathLike = Optional[Union[str, "os.PathLike[str]"]]  # noqa: UP007, UP045 (forward reference)


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
        pixel_mean=list(PIXEL_MEAN),
        pixel_std=list(PIXEL_STD),
    )
    sam.eval()
    return sam


def check_sam_variant(state_dict: dict[str, torch.Tensor], variant: str, path: str) -> None:
    """Refuse a state dict that is not an official SAM of ``variant``'s width and depth."""
    check_not_blsam(state_dict, path)
    found = describe_sam_encoder(state_dict)
    if found is None:
        raise CheckpointError(
            f"{path!r} is not a SAM checkpoint: no 'image_encoder.patch_embed.proj.weight' key"
        )
    enc = get_spec(variant).encoder
    want = (enc.embed_dim, enc.depth)
    if found != want:
        name = SAM_ENCODER_NAMES.get(found, f"embed dim {found[0]}, {found[1]} blocks")
        raise CheckpointError(
            f"{path!r} holds a SAM {name} image encoder, but this model needs SAM "
            f"{SAM_ENCODER_NAMES[want]} (embed dim {want[0]}, {want[1]} blocks)"
        )


def _kind(variant: str) -> str:
    spec = get_spec(variant)
    return "bLViT" if spec.is_blvit else "token-pruning" if spec.is_pruning else "vanilla SAM"


def _check_build_args(variant: str, want: str, keep_ratio: float, img_size: int,
                      skip_padding: bool) -> None:
    """Every argument checked before a block is built (an h_b costs seconds to build)."""
    if _kind(variant) != want:
        raise ValueError(f"{variant!r} is not a {want} model")
    check_keep_ratio(keep_ratio)
    check_img_size(img_size)
    if not isinstance(skip_padding, bool):
        raise TypeError(f"skip_padding must be a bool, got {skip_padding!r}")


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
    # vanilla SAM routes nothing; the arguments are accepted so every builder is interchangeable
    _check_build_args(variant, "vanilla SAM", keep_ratio, img_size, skip_padding)
    if checkpoint is not None and sam_checkpoint is not None:
        raise ValueError("give either checkpoint or sam_checkpoint, not both")
    path = checkpoint if checkpoint is not None else sam_checkpoint
    sd = None
    if path is not None:  # read and checked before building: a wrong file fails in a second
        check_metadata(path, variant, None)  # an official SAM: positions resize
        sd = read_state_dict(path, "SAM checkpoint")
        check_sam_variant(sd, variant, os.fspath(path))
    enc = get_spec(variant).encoder
    if fused:
        encoder: torch.nn.Module = BLViTImageEncoder(dense_spec(variant), img_size=img_size)
    else:
        encoder = ImageEncoderViT(
            depth=enc.depth, embed_dim=enc.embed_dim, img_size=img_size, mlp_ratio=enc.mlp_ratio,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=enc.num_heads,
            patch_size=enc.patch_size, qkv_bias=True, use_rel_pos=True,
            global_attn_indexes=enc.global_attn_indexes, window_size=enc.window_size,
            out_chans=enc.out_chans,
        )
    sam = _sam_with_encoder(encoder, img_size)
    if sd is not None:
        load_strict(sam, adapt_sam_state_dict(sd, sam.state_dict()), f"SAM checkpoint {path!r}")
    return sam


def load_sam_into_blsam(sam: Sam, path: PathLike, variant: str,
                        state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Initialise a bLViT-SAM from an official SAM checkpoint (P-blocks, embeddings, neck,
    prompt encoder, mask decoder); E-blocks, predictors, alpha and gamma keep their init.
    ``state_dict``: the file's contents when the caller has already read and checked them."""
    path = os.fspath(path)
    sd = state_dict
    if sd is None:
        sd = read_state_dict(path, "SAM checkpoint")
        check_sam_variant(sd, variant, path)
    own = sam.state_dict()
    sd = adapt_sam_state_dict(sd, own)
    unexpected = sorted(k for k in sd if k not in own)
    if unexpected:
        raise CheckpointError(
            f"SAM checkpoint {path!r} has keys this model lacks: {unexpected[:20]}")
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
    _check_build_args(variant, "bLViT", keep_ratio, img_size, skip_padding)
    if checkpoint is not None and sam_checkpoint is not None:
        raise ValueError("give either checkpoint (trained bLViT-SAM) or sam_checkpoint, not both")
    spec = get_spec(variant)
    sd = None  # read and checked before building: a wrong file fails in a second
    if sam_checkpoint is not None:
        check_metadata(sam_checkpoint, spec.teacher, None)
        sd = read_state_dict(sam_checkpoint, "SAM checkpoint")
        check_sam_variant(sd, spec.teacher, os.fspath(sam_checkpoint))
    elif checkpoint is not None:
        check_metadata(checkpoint, variant, img_size)
        sd = read_state_dict(checkpoint, "bLViT-SAM checkpoint")
        # a spec without E-blocks or predictors (Table-3 step 1) has exactly SAM's parameters:
        # its trained checkpoint is SAM-shaped, and loading SAM's own is the same as
        # sam_checkpoint=, so only specs with parameters of their own refuse a SAM file
        own_params = spec.encoder.e_dim > 0 or (
            spec.encoder.scorer == "predictor" and bool(spec.encoder.predictor_after))
        if own_params and describe_sam_encoder(sd) and not any(".e_block." in k for k in sd):
            raise CheckpointError(
                f"{os.fspath(checkpoint)!r} is a vanilla SAM checkpoint, not a bLViT-SAM one: "
                f"pass it as sam_checkpoint= to initialise the P-blocks from it"
            )
    encoder = BLViTImageEncoder(spec.encoder, img_size=img_size, keep_ratio=keep_ratio,
                                skip_padding=skip_padding)
    sam = _sam_with_encoder(encoder, img_size)
    if sam_checkpoint is not None:
        load_sam_into_blsam(sam, sam_checkpoint, spec.teacher, sd)
    elif checkpoint is not None:
        load_strict(sam, adapt_sam_state_dict(sd, sam.state_dict()),
                    f"bLViT-SAM checkpoint {os.fspath(checkpoint)!r}")
    return sam


PRUNING_ENCODERS = {"evit": EViTImageEncoder, "evovit": EvoViTImageEncoder}


def build_pruned_sam(
    variant: str,
    checkpoint: PathLike = None,
    *,
    sam_checkpoint: PathLike = None,
    keep_ratio: float | None = None,
    img_size: int = 1024,
    skip_padding: bool = False,
) -> Sam:
    """A token-pruning baseline (EViT, Evo-ViT) on SAM; ``keep_ratio`` default 0.5.

    It has exactly SAM's parameters, so both an official SAM checkpoint (``sam_checkpoint``)
    and a trained one (``checkpoint``) load with strict key checks."""
    spec = get_spec(variant)
    keep_ratio = spec.default_keep_ratio if keep_ratio is None else keep_ratio
    _check_build_args(variant, "token-pruning", keep_ratio, img_size, skip_padding)
    if skip_padding:
        raise ValueError(f"{variant}: the pruning baselines have no padding-aware routing")
    if checkpoint is not None and sam_checkpoint is not None:
        raise ValueError("give either checkpoint (trained) or sam_checkpoint, not both")
    path = checkpoint if checkpoint is not None else sam_checkpoint
    sd = None
    if path is not None:  # read and checked before building: a wrong file fails in a second
        what = "SAM checkpoint" if checkpoint is None else f"{variant} checkpoint"
        sd = read_state_dict(path, what)
        check_sam_variant(sd, spec.teacher, os.fspath(path))
    encoder = PRUNING_ENCODERS[spec.pruning.method](spec.encoder, spec.pruning,
                                                    img_size=img_size, keep_ratio=keep_ratio)
    sam = _sam_with_encoder(encoder, img_size)
    if sd is not None:
        load_strict(sam, adapt_sam_state_dict(sd, sam.state_dict()), f"checkpoint {path!r}")
    return sam


INIT_CHOICES = ("sam", "random")


@torch.no_grad()
def reinit_image_encoder_(sam: Sam, name: str, keep_ratio: float | None = None,
                          img_size: int = 1024) -> Sam:
    """Give ``sam``'s image encoder a from-scratch initialisation (``blsam-train --init
    random``: the Table-3 step before "Pretrain"), keeping its prompt encoder and mask decoder.

    Every encoder parameter gets the value a registry build without checkpoint draws (the
    torch RNG decides, so a seeded run is reproducible); ``pos_embed``, which SAM's code leaves
    at zero for its checkpoint to fill, gets ViT's truncated-normal(0.02) start instead, as a
    ViT trained from scratch has. Relative-position tables start at zero, as in SAM's code.
    """
    if keep_ratio is None:
        keep_ratio = get_spec(name).default_keep_ratio
    fresh = blsam_model_registry[name](keep_ratio=keep_ratio, img_size=img_size)
    sam.image_encoder.load_state_dict(fresh.image_encoder.state_dict(), strict=True)
    pos = getattr(sam.image_encoder, "pos_embed", None)
    if pos is not None:
        torch.nn.init.trunc_normal_(pos, std=0.02)
    return sam


def _builder(spec) -> Callable[..., Sam]:
    if spec.is_pruning:
        return build_pruned_sam
    return build_blsam if spec.is_blvit else build_vanilla_sam


blsam_model_registry: dict[str, Callable[..., Sam]] = {
    name: partial(_builder(spec), name) for name, spec in MODEL_SPECS.items()
}
blsam_model_registry["default"] = blsam_model_registry[DEFAULT_MODEL]


def build_model(
    name: str,
    checkpoint: PathLike = None,
    sam_checkpoint: PathLike = None,
    keep_ratio: float | None = None,
    img_size: int = 1024,
    skip_padding: bool = False,
) -> Sam:
    """Registry lookup for scripts with ``--model/--checkpoint/--sam-checkpoint`` flags.

    For vanilla SAM an official checkpoint may come through either flag (it is the same file).
    ``keep_ratio`` None: the model's default (0.25 bLViT, 0.5 pruning baselines).
    """
    if name not in blsam_model_registry:
        raise KeyError(f"unknown model {name!r}; choose from {sorted(blsam_model_registry)}")
    if keep_ratio is None:
        keep_ratio = get_spec(name).default_keep_ratio
    if get_spec(name).teacher is None:
        if checkpoint is not None and sam_checkpoint is not None:
            raise ValueError("vanilla SAM takes one checkpoint: give --checkpoint only")
        return blsam_model_registry[name](checkpoint if checkpoint is not None else sam_checkpoint,
                                          img_size=img_size)
    return blsam_model_registry[name](checkpoint, sam_checkpoint=sam_checkpoint,
                                      keep_ratio=keep_ratio, img_size=img_size,
                                      skip_padding=skip_padding)
