"""Validation during distillation, on held-out SA-1B images (none of them in the training set).

Three signals, each answering a question a week-long run must be able to answer early:
* ``cos_sim``: does the student's embedding approach the teacher's on unseen images (same
  positions as the feature loss: SAM's padding excluded unless ``--fd-padding include``)?
* ``miou_point`` / ``miou_box``: masks against the ground truth for SAM's centre click (the
  pixel farthest from the mask boundary; of the 3 outputs the one with the highest predicted
  IoU, as SAM answers one click) and for the exact box;
* ``miou_teacher_point`` / ``miou_teacher_box``: the student's masks against the teacher's
  (vanilla SAM with its own prompt encoder and decoder) for the same prompts: 1.0 means the
  student answers like SAM.
IoUs are computed at the decoder's resolution (S/4), like the training loss; use
``eval/zero_shot.py`` for the paper's full-resolution protocol.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..modeling.prompt_inputs import prompt_inputs
from .losses import mask_iou, real_positions

VAL_KEYS = ("cos_sim", "miou_point", "miou_box", "miou_teacher_point", "miou_teacher_box")


class PromptHead(nn.Module):
    """SAM's prompt encoder + mask decoder, frozen: the teacher's half of SAM after the encoder."""

    def __init__(self, prompt_encoder: nn.Module, mask_decoder: nn.Module) -> None:
        super().__init__()
        self.prompt_encoder, self.mask_decoder = prompt_encoder, mask_decoder
        self.eval().requires_grad_(False)


def decode(prompt_encoder: nn.Module, mask_decoder: nn.Module, emb: torch.Tensor,
           points: torch.Tensor | None, labels: torch.Tensor | None,
           boxes: torch.Tensor | None) -> torch.Tensor:
    """(M, h, w) low-res logits for one image's M prompts; a single click picks the output with
    the highest predicted IoU of SAM's three, a box uses the single output. The prompt inputs
    are training's (``prompt_inputs``: fp32 under autocast)."""
    sparse, dense, image_pe = prompt_inputs(
        prompt_encoder, None if points is None else (points, labels), boxes, None)
    multi = points is not None and points.shape[1] == 1
    logits, iou = mask_decoder(image_embeddings=emb, image_pe=image_pe,
                               sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                               multimask_output=multi)
    if multi:
        best = iou.argmax(1)
        return logits[torch.arange(logits.shape[0], device=logits.device), best].float()
    return logits[:, 0].float()


@torch.no_grad()
def evaluate(sam: nn.Module, head: PromptHead, teacher: Any, loader: Any, device: torch.device,
             amp: torch.dtype | None, fd_padding: str = "exclude") -> dict[str, float]:
    """The ``VAL_KEYS`` metrics over this rank's loader, summed over ranks (mean per mask /
    per position), plus ``images`` and ``masks``. The student is put back in its mode."""
    was_training = sam.training
    sam.eval()
    # cos sum, positions, point IoU, box IoU, teacher point, teacher box, masks, images
    acc = torch.zeros(8, dtype=torch.float64, device=device)
    try:
        for batch in loader:
            images = batch["image"].to(device)
            t_emb = teacher.embeddings(images, batch["teacher"]).float()
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                s_emb = sam.image_encoder(images)
            s_emb = s_emb.float()
            cos = F.cosine_similarity(s_emb, t_emb, dim=1, eps=1e-6)
            if fd_padding == "exclude":
                valid = real_positions(batch["hw"], s_emb.shape[-1],
                                       images.shape[-1] // s_emb.shape[-1], device)
            else:
                valid = torch.ones_like(cos, dtype=torch.bool)
            acc[0] += (cos * valid).sum().double()
            acc[1] += valid.sum().double()
            acc[7] += images.shape[0]
            for i, gt in enumerate(batch["masks"]):
                gt = gt.to(device)
                pts = batch["points"][i].to(device)
                lab = batch["labels"][i].to(device)
                box = batch["boxes"][i].to(device)
                for j, (p, lb, b) in enumerate(((pts, lab, None), (None, None, box))):
                    s = decode(sam.prompt_encoder, sam.mask_decoder, s_emb[i:i + 1], p, lb, b)
                    t = decode(head.prompt_encoder, head.mask_decoder, t_emb[i:i + 1], p, lb, b)
                    acc[2 + j] += mask_iou(s, gt).sum().double()
                    acc[4 + j] += mask_iou(s, (t > 0).float()).sum().double()
                acc[6] += gt.shape[0]
    finally:
        sam.train(was_training)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(acc)
    a = acc.cpu().tolist()
    m = max(a[6], 1.0)
    return {"cos_sim": a[0] / max(a[1], 1.0), "miou_point": a[2] / m, "miou_box": a[3] / m,
            "miou_teacher_point": a[4] / m, "miou_teacher_box": a[5] / m,
            "images": int(a[7]), "masks": int(a[6])}
