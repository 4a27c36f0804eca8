"""Losses: SAM's supervised mask loss and the paper's feature-distillation loss (§3.3).

Mask losses work at the decoder's own resolution (img_size/4, 256 px at 1024): the GT is
downsampled there (see ``data.downsample_mask``) instead of upsampling 3 x M logit maps to
1024², which would cost ~16x the memory for the same supervision signal. All losses are
computed in fp32 regardless of autocast.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

FOCAL_WEIGHT, DICE_WEIGHT = 20.0, 1.0  # SAM: focal:dice = 20:1


def feature_loss(student: torch.Tensor, teacher: torch.Tensor,
                 valid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """1 - cosine similarity over channels of (B, C, H, W) embeddings, averaged over the
    positions where ``valid`` (B, H, W) is true (all of them when ``valid`` is None).

    Returns {"loss_fd", "cos_sim"}; identical inputs give 0, negated inputs give 2.
    """
    cos = F.cosine_similarity(student.float(), teacher.float(), dim=1, eps=1e-6)
    if valid is None:
        cos_mean = cos.mean()
    else:
        v = valid.to(cos.dtype)
        cos_mean = (cos * v).sum() / v.sum().clamp(min=1.0)
    return {"loss_fd": 1.0 - cos_mean, "cos_sim": cos_mean.detach()}


def real_positions(hw: Sequence[tuple[int, int]], grid: int, patch: int = 16,
                   device: torch.device | None = None) -> torch.Tensor:
    """(B, grid, grid) bool: embedding positions whose patch holds image pixels, not SAM's
    bottom/right zero padding (a patch that is partly image counts as image)."""
    out = torch.zeros(len(hw), grid, grid, dtype=torch.bool, device=device)
    for i, (h, w) in enumerate(hw):
        out[i, : math.ceil(h / patch), : math.ceil(w / patch)] = True
    return out


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25,
                       gamma: float = 2.0) -> torch.Tensor:
    """Per-mask focal loss, mean over pixels: (..., H, W) -> (...)."""
    logits, targets = logits.float(), targets.float()
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.flatten(-2).mean(-1)


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Per-mask soft dice loss: (..., H, W) -> (...); ~0 for a confident perfect prediction."""
    p = torch.sigmoid(logits.float()).flatten(-2)
    t = targets.float().flatten(-2)
    num = 2 * (p * t).sum(-1) + eps
    den = p.sum(-1) + t.sum(-1) + eps
    return 1 - num / den


def mask_iou(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """IoU of the binarised prediction (logit > 0) with the target: (..., H, W) -> (...)."""
    pred = logits.detach() > 0
    t = targets > 0.5
    inter = (pred & t).flatten(-2).sum(-1).float()
    union = (pred | t).flatten(-2).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))


def mask_losses(logits: torch.Tensor, iou_pred: torch.Tensor, targets: torch.Tensor
                ) -> dict[str, torch.Tensor]:
    """SAM's supervised loss for one image's prompts, summed over its masks.

    logits (M, K, h, w) and iou_pred (M, K) from the decoder (K = 1, or 3 with multimask
    output); targets (M, h, w). With K > 1 only the output with the lowest mask loss is
    back-propagated (SAM's rule for ambiguous prompts). IoU head: MSE against the actual IoU of
    that predicted mask (detached). Returns sums (the caller divides by the mask count), and
    ``best`` (M,): the index of the output that was back-propagated.
    """
    t = targets.unsqueeze(1).expand_as(logits)
    per = FOCAL_WEIGHT * sigmoid_focal_loss(logits, t) + DICE_WEIGHT * dice_loss(logits, t)
    best = per.argmin(dim=1, keepdim=True)  # (M, 1)
    loss_mask = per.gather(1, best).squeeze(1)
    iou_true = mask_iou(logits, t).gather(1, best).squeeze(1)
    iou_hat = iou_pred.float().gather(1, best).squeeze(1)
    loss_iou = F.mse_loss(iou_hat, iou_true, reduction="none")
    return {"loss_mask": loss_mask.sum(), "loss_iou": loss_iou.sum(),
            "iou": iou_true.sum().detach(), "best": best.squeeze(1)}


def total_loss(supervised: torch.Tensor | None, loss_fd: torch.Tensor, lambda_fd: float
               ) -> torch.Tensor:
    """L_total = L_supervised + lambda_fd * L_fd (paper eq. 5)."""
    return loss_fd * lambda_fd if supervised is None else supervised + lambda_fd * loss_fd
