"""The student under training: forward + losses in one module (so DDP sees every trainable
parameter), SAM's interactive prompting, trainable parts, optimizer and LR schedule.

Interactive prompting (SAM paper, App. A, "training algorithm"): after the first prompt, each
further iteration feeds the previous low-res mask logits back as the mask prompt and, on most
iterations, adds one click drawn uniformly from the error region (positive in a false
negative, negative in a false positive); the loss is taken on every iteration. SAM used 11
iterations: the first prompt, 8 with a new click, and 2 with none (one at a random place among
them, one last). Clicks are drawn on the device from a generator seeded per image by the data
pipeline, so a resumed run draws the same clicks and no host sync is needed.
"""
from __future__ import annotations

import argparse
import hashlib
import math
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from .losses import feature_loss, mask_losses, real_positions, total_loss

TRAINABLE_PARTS = ("image_encoder", "prompt_encoder", "mask_decoder")
NO_DECAY_KEYS = ("pos_embed", "rel_pos", "alpha_", "gamma_")
METRIC_KEYS = ("loss", "loss_mask", "loss_iou", "loss_fd", "cos_sim", "iou", "iou_final")
FD_PADDING = ("exclude", "include")


def click_schedule(iters: int, seed: int) -> List[bool]:
    """For iterations 1..iters-1: whether that iteration adds a click. The last adds none, and
    (from 4 iterations on) one random middle one adds none: SAM's 11 = 1 + 8 clicks + 2."""
    if iters <= 1:
        return []
    clicks = [True] * (iters - 1)
    clicks[-1] = False
    if iters >= 4:
        clicks[int(np.random.default_rng(seed).integers(0, iters - 2))] = False
    return clicks


def error_click(logits: torch.Tensor, targets: torch.Tensor, gen: torch.Generator,
                scale: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """One click per mask from the error region of (M, 1, h, w) low-res logits against (M, h, w)
    targets: ((M, 1, 2) x, y integer pixel indices at full resolution, (M, 1) labels: 1 in a
    false negative, 0 in a false positive, -1 (SAM's "not a point") when there is no error).

    Uniform over error pixels without a host sync: the argmax of iid uniforms masked to the
    error region. The pixel inside the low-res cell is uniform too (``scale`` = S / h).
    """
    m, _, h, w = logits.shape
    gt = targets > 0.5
    err = ((logits[:, 0] > 0) != gt).flatten(1)
    u = torch.rand(err.shape, generator=gen, device=err.device)
    idx = (u * err).argmax(1)
    has = err.any(1)
    label = gt.flatten(1).gather(1, idx[:, None])[:, 0].long()
    label = torch.where(has, label, torch.full_like(label, -1))
    sub = torch.randint(0, scale, (m, 2), generator=gen, device=err.device)
    xy = torch.stack([(idx % w) * scale, (idx // w) * scale], dim=-1) + sub
    return xy[:, None].float(), label[:, None]


class DistillModel(nn.Module):
    """Student forward + all losses in one module, so DDP sees every trainable parameter.

    ``prompt_iters``: 1 = one prompt per mask; > 1 = SAM's interactive training (11 in SAM).
    ``fd_padding``: "exclude" leaves SAM's zero padding out of the feature loss (EdgeSAM),
    "include" averages over every position (the paper's formula read literally).
    """

    def __init__(self, sam: nn.Module, lambda_fd: float, prompt_iters: int = 1,
                 fd_padding: str = "exclude") -> None:
        super().__init__()
        if prompt_iters < 1:
            raise ValueError(f"prompt_iters must be >= 1, got {prompt_iters}")
        if fd_padding not in FD_PADDING:
            raise ValueError(f"fd_padding must be one of {FD_PADDING}, got {fd_padding!r}")
        self.sam = sam
        self.lambda_fd = lambda_fd
        self.prompt_iters = prompt_iters
        self.fd_padding = fd_padding

    def forward(self, images: torch.Tensor, batch: Dict[str, Any], teacher_emb: torch.Tensor
                ) -> Dict[str, torch.Tensor]:
        sam = self.sam
        emb = sam.image_encoder(images)
        valid = None
        if self.fd_padding == "exclude" and batch.get("hw") is not None:
            valid = real_positions(batch["hw"], emb.shape[-1], images.shape[-1] // emb.shape[-1],
                                   images.device)
        out = feature_loss(emb, teacher_emb, valid)
        dev = images.device
        image_pe = sam.prompt_encoder.get_dense_pe()
        keys = ("loss_mask", "loss_iou", "iou", "iou_final")
        sums = {k: torch.zeros((), device=dev) for k in keys}
        n = 0
        for i, masks in enumerate(batch["masks"]):
            if masks is None or masks.shape[0] == 0:
                continue
            r = self.prompt_losses(emb[i:i + 1], image_pe, batch, i, masks.to(dev),
                                   images.shape[-1])
            for k in keys:
                sums[k] = sums[k] + r[k]
            n += masks.shape[0]
        if n:
            supervised = (sums["loss_mask"] + sums["loss_iou"]) / n
        else:  # keep trainable decoder params in the graph so DDP's reducer does not stall
            supervised = sum((p.sum() * 0 for n_, p in sam.named_parameters()
                              if p.requires_grad and not n_.startswith("image_encoder.")),
                             torch.zeros((), device=dev))
        out["loss"] = total_loss(supervised, out["loss_fd"], self.lambda_fd)
        out["loss_mask"] = sums["loss_mask"].detach() / max(n, 1)
        out["loss_iou"] = sums["loss_iou"].detach() / max(n, 1)
        out["iou"] = sums["iou"] / max(n, 1)
        out["iou_final"] = sums["iou_final"] / max(n, 1)
        out["n_masks"] = torch.full((), float(n), device=dev)  # a fill: no host-to-device copy
        return out

    def prompt_losses(self, emb: torch.Tensor, image_pe: torch.Tensor, batch: Dict[str, Any],
                      i: int, targets: torch.Tensor, img_size: int) -> Dict[str, torch.Tensor]:
        """One image's masks through ``prompt_iters`` prompt/decoder iterations; mask and IoU
        losses summed over masks and averaged over iterations (so their scale does not depend
        on the iteration count); ``iou`` after the first prompt, ``iou_final`` after the last."""
        sam, dev, kind = self.sam, emb.device, batch["kind"][i]
        boxes = batch["boxes"][i].to(dev) if kind == "box" else None
        points = None
        if kind != "box":
            points = (batch["points"][i].to(dev), batch["labels"][i].to(dev))
        iters = self.prompt_iters
        seed = batch.get("seed", [None] * (i + 1))[i]
        clicks = click_schedule(iters, seed or 0)
        gen = None
        if iters > 1:
            gen = torch.Generator(device=dev)
            gen.manual_seed(int(seed or 0) % (2 ** 63))
        mask_in: Optional[torch.Tensor] = None
        acc = {k: torch.zeros((), device=dev) for k in ("loss_mask", "loss_iou")}
        first_iou = last_iou = torch.zeros((), device=dev)
        for it in range(iters):
            sparse, dense = sam.prompt_encoder(points=points, boxes=boxes, masks=mask_in)
            logits, iou_pred = sam.mask_decoder(
                image_embeddings=emb, image_pe=image_pe, sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense, multimask_output=(kind == "point" and it == 0))
            r = mask_losses(logits, iou_pred, targets)
            acc["loss_mask"] = acc["loss_mask"] + r["loss_mask"]
            acc["loss_iou"] = acc["loss_iou"] + r["loss_iou"]
            if it == 0:
                first_iou = r["iou"]
            last_iou = r["iou"]
            if it == iters - 1:
                break
            h, w = logits.shape[-2:]
            chosen = logits.gather(1, r["best"][:, None, None, None].expand(-1, 1, h, w))
            mask_in = chosen.detach()  # SAM feeds back the unthresholded logits
            if clicks[it]:
                xy, lab = error_click(mask_in, targets, gen, img_size // h)
                if points is None:
                    points = (xy, lab)
                else:
                    points = (torch.cat([points[0], xy], 1), torch.cat([points[1], lab], 1))
        return {"loss_mask": acc["loss_mask"] / iters, "loss_iou": acc["loss_iou"] / iters,
                "iou": first_iou, "iou_final": last_iou}


def set_trainable(sam: nn.Module, spec: str) -> List[str]:
    """requires_grad only on the named parts; returns the parts."""
    parts = parse_trainable(spec)
    for name in TRAINABLE_PARTS:
        getattr(sam, name).requires_grad_(name in parts)
    return parts


def parse_trainable(spec: str) -> List[str]:
    parts = list(TRAINABLE_PARTS) if spec.strip() == "all" else [
        s.strip() for s in spec.split(",") if s.strip()]
    bad = [s for s in parts if s not in TRAINABLE_PARTS]
    if bad or not parts:
        raise ValueError(f"--trainable {spec!r}: parts must be among {TRAINABLE_PARTS} or 'all'")
    return parts


def enable_grad_checkpointing(encoder: nn.Module) -> None:
    """Recompute each encoder block in backward instead of keeping its activations.

    The block's ``forward`` is wrapped on the instance, so parameter names (and checkpoints)
    stay SAM's. Non-reentrant checkpointing handles the routing dataclass and DDP.
    """
    from torch.utils.checkpoint import checkpoint

    for blk in encoder.blocks:
        inner = blk.forward

        def forward(*a: Any, _inner=inner, **k: Any) -> torch.Tensor:
            if not torch.is_grad_enabled():
                return _inner(*a, **k)
            return checkpoint(_inner, *a, use_reentrant=False, **k)

        blk.forward = forward


def param_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """AdamW groups: no decay on norms, biases, position tables, alpha and gamma."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or any(k in name for k in NO_DECAY_KEYS):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """AdamW; the fused kernel (one pass over all tensors, ~6x faster on CPU) when available."""
    groups = param_groups(model, args.weight_decay)
    try:
        return torch.optim.AdamW(groups, lr=args.lr, betas=tuple(args.betas), fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=args.lr, betas=tuple(args.betas))


def lr_lambda(warmup: int, total: int, min_ratio: float):
    """Linear warmup to 1, then cosine to ``min_ratio`` at ``total`` steps (per optimizer step)."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return f


def amp_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]


def state_checksum(state: Dict[str, torch.Tensor]) -> str:
    """sha256 over a state dict's tensors in key order (bitwise identity across ranks)."""
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()
