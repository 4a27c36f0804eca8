"""The student under training: forward + losses in one module (so DDP sees every trainable
parameter), SAM's interactive prompting, trainable parts, optimizer and LR schedule.

Interactive prompting (SAM paper, App. A, "training algorithm"): after the first prompt, each
further iteration feeds the previous low-res mask logits back as the mask prompt and, on most
iterations, adds one click drawn uniformly from the error region (positive in a false
negative, negative in a false positive); the loss is taken on every iteration. SAM used 11
iterations: the first prompt, 8 with a new click, and 2 with none (one at a random place among
them, one last). Clicks are drawn on the device from a generator seeded per image by the data
pipeline, so a resumed run draws the same clicks and no host sync is needed.

The prompt encoder and mask decoder run once per iteration over all images' masks, one call per
group of prompts of the same form (multimask or not, box or not, click count), through
``decoder.decode_masks``: SAM's decoder repeats one image's embedding for its prompts. The
prompt encoder's outputs and the dense PE come from ``modeling.prompt_inputs`` (fp32 under
autocast, no host sync), the one function validation and evaluation use too.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn as nn

from ..modeling.prompt_inputs import prompt_inputs
from .decoder import decode_masks
from .losses import feature_loss, mask_losses, real_positions, total_loss

TRAINABLE_PARTS = ("image_encoder", "prompt_encoder", "mask_decoder")
NO_DECAY_KEYS = ("pos_embed", "rel_pos", "alpha_", "gamma_")
METRIC_KEYS = ("loss", "loss_mask", "loss_iou", "loss_fd", "cos_sim", "iou", "iou_final")
FD_PADDING = ("exclude", "include")

if TYPE_CHECKING:
    from .config import OptimConfig


def click_schedule(iters: int, seed: int) -> list[bool]:
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
                scale: int) -> tuple[torch.Tensor, torch.Tensor]:
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


@dataclass
class ImagePrompts:
    """One image's masks and their prompts through the interactive iterations."""
    index: torch.Tensor  # (M,) the image's place in the batch, once per mask
    targets: torch.Tensor  # (M, h, w) low-res GT
    multimask: bool  # one click: 3 outputs on the first iteration (SAM's ambiguity rule)
    boxes: torch.Tensor | None  # (M, 4)
    points: tuple[torch.Tensor, torch.Tensor] | None  # (M, P, 2), (M, P)
    clicks: list[bool]  # click_schedule: whether iteration it + 1 adds a click
    gen: torch.Generator | None  # the image's own click generator
    mask_in: torch.Tensor | None = None  # (M, 1, h, w) previous logits, detached

    def form(self, it: int) -> tuple[bool, bool, int]:
        """Prompts of the same form (outputs, box, click count) batch in one decoder call."""
        return (self.multimask and it == 0, self.boxes is not None,
                0 if self.points is None else self.points[1].shape[1])

    def add_click(self, click: tuple[torch.Tensor, torch.Tensor]) -> None:
        if self.points is None:
            self.points = click
        else:
            self.points = (torch.cat([self.points[0], click[0]], 1),
                           torch.cat([self.points[1], click[1]], 1))


def _cat(xs: list[torch.Tensor | None]) -> torch.Tensor | None:
    """Concatenate along masks (None for absent prompts; no copy for one image)."""
    if xs[0] is None:
        return None
    return xs[0] if len(xs) == 1 else torch.cat(xs)


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

    def forward(self, images: torch.Tensor, batch: dict[str, Any], teacher_emb: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        sam = self.sam
        emb = sam.image_encoder(images)
        valid = None
        if self.fd_padding == "exclude" and batch.get("hw") is not None:
            valid = real_positions(batch["hw"], emb.shape[-1], images.shape[-1] // emb.shape[-1],
                                   images.device)
        out = feature_loss(emb, teacher_emb, valid)
        dev = images.device
        prompts = self.image_prompts(batch, dev)
        n = sum(p.targets.shape[0] for p in prompts)
        if n:
            sums = self.prompt_losses(emb, prompts, images.shape[-1])
            supervised = (sums["loss_mask"] + sums["loss_iou"]) / n
        else:  # keep trainable decoder params in the graph so DDP's reducer does not stall
            sums = {k: torch.zeros((), device=dev)
                    for k in ("loss_mask", "loss_iou", "iou", "iou_final")}
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

    def image_prompts(self, batch: dict[str, Any], dev: torch.device) -> list[ImagePrompts]:
        """The batch's images with masks (others are skipped), their prompts on ``dev``."""
        out = []
        seeds = batch.get("seed") or [None] * len(batch["masks"])
        for i, masks in enumerate(batch["masks"]):
            if masks is None or masks.shape[0] == 0:
                continue
            kind, seed = batch["kind"][i], seeds[i] or 0
            gen = None
            if self.prompt_iters > 1:
                gen = torch.Generator(device=dev)
                gen.manual_seed(int(seed) % (2 ** 63))
            out.append(ImagePrompts(
                index=torch.full((masks.shape[0],), i, dtype=torch.long, device=dev),
                targets=masks.to(dev), multimask=(kind == "point"),
                boxes=batch["boxes"][i].to(dev) if kind == "box" else None,
                points=None if kind == "box" else (batch["points"][i].to(dev),
                                                   batch["labels"][i].to(dev)),
                clicks=click_schedule(self.prompt_iters, seed), gen=gen))
        return out

    def prompt_losses(self, emb: torch.Tensor, prompts: list[ImagePrompts], img_size: int
                      ) -> dict[str, torch.Tensor]:
        """All images' masks through ``prompt_iters`` prompt/decoder iterations: mask and IoU
        losses summed over masks and averaged over iterations (so their scale does not depend
        on the iteration count); ``iou`` summed after the first prompt, ``iou_final`` after the
        last. Each iteration runs the prompt encoder and the decoder once per group of masks
        whose prompts have the same form (see ``ImagePrompts.form``), not once per image."""
        sam, dev, iters = self.sam, emb.device, self.prompt_iters
        acc = {k: torch.zeros((), device=dev) for k in ("loss_mask", "loss_iou")}
        first_iou = last_iou = torch.zeros((), device=dev)
        for it in range(iters):
            groups: dict[tuple[bool, bool, int], list[ImagePrompts]] = {}
            for p in prompts:
                groups.setdefault(p.form(it), []).append(p)
            iou = torch.zeros((), device=dev)
            for (multimask, _, _), members in groups.items():
                boxes = _cat([p.boxes for p in members])
                points = None
                if members[0].points is not None:
                    points = (_cat([p.points[0] for p in members]),
                              _cat([p.points[1] for p in members]))
                masks = None if it == 0 else _cat([p.mask_in for p in members])
                # fp32 under autocast and sync-free, like validation and evaluation
                sparse, dense, image_pe = prompt_inputs(sam.prompt_encoder, points, boxes, masks)
                logits, iou_pred = decode_masks(
                    sam.mask_decoder, emb, _cat([p.index for p in members]), image_pe, sparse,
                    dense, multimask)
                r = mask_losses(logits, iou_pred, _cat([p.targets for p in members]))
                acc["loss_mask"] = acc["loss_mask"] + r["loss_mask"]
                acc["loss_iou"] = acc["loss_iou"] + r["loss_iou"]
                iou = iou + r["iou"]
                if it == iters - 1:
                    continue
                h, w = logits.shape[-2:]
                chosen = logits.gather(1, r["best"][:, None, None, None].expand(-1, 1, h, w))
                # SAM feeds back the unthresholded logits
                chosen = chosen.detach().split([p.targets.shape[0] for p in members])
                for p, mask_in in zip(members, chosen):
                    p.mask_in = mask_in
                    if p.clicks[it]:  # the image's own generator: draws independent of batching
                        p.add_click(error_click(mask_in, p.targets, p.gen, img_size // h))
            if it == 0:
                first_iou = iou
            last_iou = iou
        return {"loss_mask": acc["loss_mask"] / iters, "loss_iou": acc["loss_iou"] / iters,
                "iou": first_iou, "iou_final": last_iou}


def set_trainable(sam: nn.Module, spec: str) -> list[str]:
    """requires_grad only on the named parts; returns the parts."""
    parts = parse_trainable(spec)
    for name in TRAINABLE_PARTS:
        getattr(sam, name).requires_grad_(name in parts)
    return parts


def parse_trainable(spec: str) -> list[str]:
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

    encoder.grad_checkpointing = True  # the pruning baselines' kept-token layers read this
    for blk in encoder.blocks:
        inner = blk.forward

        def forward(*a: Any, _inner=inner, **k: Any) -> torch.Tensor:
            if not torch.is_grad_enabled():
                return _inner(*a, **k)
            return checkpoint(_inner, *a, use_reentrant=False, **k)

        blk.forward = forward


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
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


def make_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    """AdamW; the fused kernel (one pass over all tensors, ~6x faster on CPU) when available."""
    groups = param_groups(model, optim.weight_decay)
    try:
        return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas))


def lr_lambda(warmup: int, total: int, min_ratio: float):
    """Linear warmup to 1, then cosine to ``min_ratio`` at ``total`` steps (per optimizer step)."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return f


def state_checksum(state: dict[str, torch.Tensor]) -> str:
    """sha256 over a state dict's tensors in key order (bitwise identity across ranks)."""
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()
