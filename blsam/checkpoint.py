"""Checkpoint reading and SAM state-dict adaptation.

Why a module of its own: every entry point (builders, training resume, eval, export) must read
checkpoints the same safe way (``weights_only=True``) and fail with a message that names the
problem instead of a shape traceback deep inside ``load_state_dict``.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .errors import UserError
from .specs import BLVIT_BY_SHAPE, SAM_ENCODER_NAMES  # noqa: F401  (re-exported)
from .utils.files import atomic_write

StateDict = dict[str, torch.Tensor]


class CheckpointError(UserError):
    """A checkpoint that cannot be used for the requested model."""


def read_state_dict(path: str | os.PathLike, what: str = "checkpoint",
                    mmap: bool = False, finite: bool | None = None) -> StateDict:
    """Read a state dict safely; unwrap training checkpoints (``{"model": ...}``) and DDP
    prefixes. ``mmap``: memory-map the file (reading only the keys of a 2.5 GB ViT-H file
    costs nothing); legacy non-zip files are read whole. A ``.safetensors`` file (told by its
    content) is read through the ``safetensors`` package (``blsam.weights``). ``finite``
    (default: unless ``mmap``): refuse a NaN / inf weight, which would evaluate or export to
    garbage silently (mIoU 0.0 in a table) as training resume already refuses it."""
    import zipfile

    from .weights import is_safetensors, read_safetensors

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    if is_safetensors(path):
        obj: object = read_safetensors(path, what)[0]
    else:
        obj = _read_torch(path, what, mmap and zipfile.is_zipfile(path))
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{what} {path!r} is not a state dict of tensors")
    sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}
    check = (not mmap) if finite is None else finite
    bad = first_nonfinite({"model": sd}, ("model",)) if check else None
    if bad:
        raise CheckpointError(f"{what} {path!r} holds non-finite values (NaN/inf) in "
                              f"{bad[len('model.'):]}: refusing to use it")
    return sd


def _tensors(obj: Any, prefix: str) -> Iterable[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}.{i}" if prefix else str(i))


def first_nonfinite(state: Mapping[str, Any], parts: Sequence[str] = ("model", "optimizer")
                    ) -> str | None:
    """Name of the first floating tensor of ``state[part]`` holding NaN/inf, else None. One
    host sync for the whole state (a stacked flag per tensor), not one per tensor."""
    named = [(n, t) for p in parts if p in state for n, t in _tensors(state[p], p)
             if t.is_floating_point() and t.numel()]
    if not named:
        return None
    by_dev: dict[torch.device, list[int]] = {}
    for i, (_, t) in enumerate(named):
        by_dev.setdefault(t.device, []).append(i)
    bad: list[int] = []
    for _dev, idx in by_dev.items():
        ok = torch.stack([torch.isfinite(named[i][1]).all() for i in idx]).cpu()
        bad += [idx[j] for j in (~ok).nonzero().flatten().tolist()]
    return named[min(bad)][0] if bad else None


def _read_torch(path: str, what: str, mmap: bool) -> object:
    try:
        return safe_load(path, mmap=mmap)
    except Exception as e:  # pickle errors, truncated zip, non-tensor payloads
        raise CheckpointError(f"could not read {what} {path!r}: {load_error_text(path, e)}"
                              ) from e


def safe_load(path: str, mmap: bool = False) -> object:
    """``torch.load(weights_only=True)`` on CPU, without torch's warning that asks users to
    "file an issue" when a file was pickled with another protocol (a wrong file, not a bug)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*pickle protocol.*", category=UserWarning)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def load_error_text(path: str, e: BaseException) -> str:
    """Why ``torch.load`` failed, in one line of our own words: torch's text asks the user to
    "file an issue" for what is simply a wrong or damaged file."""
    import zipfile

    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError as oe:
        return f"unreadable ({oe})"
    is_zip = zipfile.is_zipfile(path)
    if not is_zip and head[:1] != b"\x80":
        return "not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle)"
    text = str(e)
    if "Weights only load failed" in text or "weights_only" in text:
        return ("it holds Python objects other than tensors and plain containers, which safe "
                "loading (torch.load(weights_only=True)) refuses, or it is damaged")
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return f"damaged or not a PyTorch checkpoint ({type(e).__name__}: {first[:200]})"


def blsam_variant_of(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """'b_t' / 'h_b' / 'bLViT' when the state dict is a bLViT-SAM (E-blocks or predictors in
    the image encoder), else None. A bLViT-SAM looks like a SAM of the same width and depth to
    ``describe_sam_encoder``, so this is what tells the two apart."""
    if not any(".e_block." in k or k.startswith("image_encoder.predictors.") for k in state_dict):
        return None
    found = describe_sam_encoder(state_dict)
    return BLVIT_BY_SHAPE.get(found, "bLViT") if found else "bLViT"


def checkpoint_kind(path: str | os.PathLike) -> str:
    """'blsam' (a trained bLViT-SAM: E-blocks or predictors) or 'sam' (an official SAM
    checkpoint), told by the file's keys (memory-mapped: cheap even for ViT-H). Why: SAM's
    scripts have one ``--checkpoint`` flag for both (``blsam.add_to_sam_registry``)."""
    sd = read_state_dict(path, "checkpoint", mmap=True)
    if blsam_variant_of(sd) is not None:
        return "blsam"
    if describe_sam_encoder(sd) is not None:
        return "sam"
    raise CheckpointError(f"{os.fspath(path)!r} is neither a SAM nor a bLViT-SAM checkpoint: "
                          f"no 'image_encoder.patch_embed.proj.weight' key")


def check_not_blsam(state_dict: Mapping[str, torch.Tensor], path: str,
                    what: str = "SAM checkpoint") -> None:
    """A trained bLViT-SAM given where an official SAM checkpoint is expected: say what it is."""
    variant = blsam_variant_of(state_dict)
    if variant is not None:
        raise CheckpointError(
            f"{what} {path!r} is a trained bLViT-SAM checkpoint ({variant}: it has E-blocks "
            f"and routing predictors), not an official SAM checkpoint: give the SAM weights the "
            f"student was distilled from (e.g. sam_vit_b_01ec64.pth) and pass this file as "
            f"--checkpoint or --resume")


def save_atomic(obj: object, path: str | os.PathLike) -> str:
    """``torch.save`` to a temp file in the same folder, fsync, then rename over ``path``.

    A crash mid-write leaves the previous file intact: checkpoints are never half-written.
    """
    return atomic_write(path, lambda f: torch.save(obj, f))


def _short_list(keys: Iterable[str], limit: int = 20) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_strict(module: torch.nn.Module, state_dict: StateDict, what: str) -> None:
    """``load_state_dict(strict=True)`` with a readable error listing missing / unexpected /
    mis-shaped keys."""
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [
        f"{k} (checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)})"
        for k in own
        if k in state_dict and state_dict[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = [f"{what} does not match the model:"]
        if missing:
            parts.append(f"  missing keys ({len(missing)}): {_short_list(missing)}")
        if unexpected:
            parts.append(f"  unexpected keys ({len(unexpected)}): {_short_list(unexpected)}")
        if mismatched:
            parts.append(f"  shape mismatches ({len(mismatched)}): {_short_list(mismatched, 10)}")
        raise CheckpointError("\n".join(parts))
    module.load_state_dict(state_dict, strict=True)


def resize_rel_pos(rel_pos: torch.Tensor, length: int) -> torch.Tensor:
    """Linearly resize a (L, C) relative-position table, as SAM's ``get_rel_pos`` does."""
    if rel_pos.shape[0] == length:
        return rel_pos
    out = F.interpolate(
        rel_pos.float().T.unsqueeze(0), size=length, mode="linear"
    ).squeeze(0).T
    return out.to(rel_pos.dtype)


def resize_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """Bicubically resize a (1, H, W, C) absolute position embedding to (1, grid, grid, C)."""
    if pos_embed.shape[1] == grid and pos_embed.shape[2] == grid:
        return pos_embed
    out = F.interpolate(
        pos_embed.float().permute(0, 3, 1, 2), size=(grid, grid), mode="bicubic",
        align_corners=False,
    ).permute(0, 2, 3, 1)
    return out.to(pos_embed.dtype)


def adapt_sam_state_dict(
    state_dict: StateDict, target: Mapping[str, torch.Tensor], prefix: str = ""
) -> StateDict:
    """Resize position tables of a 1024-px SAM state dict to the target model's image size.

    Only ``pos_embed`` and ``rel_pos_*`` tensors whose shapes differ from the target are resized
    (global-attention layers' tables scale with the image, window layers' do not).
    """
    out = dict(state_dict)
    for k, v in state_dict.items():
        tk = prefix + k
        if tk not in target or target[tk].shape == v.shape:
            continue
        if k.endswith("pos_embed") and v.dim() == 4:
            out[k] = resize_pos_embed(v, target[tk].shape[1])
        elif ".rel_pos_" in k and v.dim() == 2 and v.shape[1] == target[tk].shape[1]:
            out[k] = resize_rel_pos(v, target[tk].shape[0])
    return out


def describe_sam_encoder(state_dict: Mapping[str, torch.Tensor]) -> tuple | None:
    """(embed_dim, depth) of the ViT image encoder in a SAM state dict, or None if absent."""
    w = state_dict.get("image_encoder.patch_embed.proj.weight")
    if w is None:
        return None
    depth = len({k.split(".")[2] for k in state_dict if k.startswith("image_encoder.blocks.")})
    return int(w.shape[0]), depth


