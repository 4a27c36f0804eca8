"""Loss values on hand-made cases: feature loss, focal, dice, IoU target, min-of-3 rule."""
from __future__ import annotations

import torch

from blsam.train.losses import (
    dice_loss,
    feature_loss,
    mask_iou,
    mask_losses,
    sigmoid_focal_loss,
    total_loss,
)


def test_feature_loss_identical_negated_orthogonal():
    x = torch.randn(2, 256, 4, 4)
    same = feature_loss(x, x.clone())
    assert abs(same["loss_fd"].item()) < 1e-6 and abs(same["cos_sim"].item() - 1) < 1e-6
    assert abs(feature_loss(x, -x)["loss_fd"].item() - 2) < 1e-6
    assert abs(feature_loss(3 * x, x)["loss_fd"].item()) < 1e-6  # scale-free
    a = torch.zeros(1, 256, 2, 2)
    b = torch.zeros(1, 256, 2, 2)
    a[:, 0], b[:, 1] = 1, 1
    assert abs(feature_loss(a, b)["loss_fd"].item() - 1) < 1e-6


def test_focal_and_dice_on_perfect_and_wrong_predictions():
    t = torch.zeros(1, 8, 8)
    t[:, 2:6, 2:6] = 1
    perfect = (t * 2 - 1) * 20  # confident and right
    assert dice_loss(perfect, t).item() < 1e-3
    assert sigmoid_focal_loss(perfect, t).item() < 1e-6
    wrong = -perfect
    assert dice_loss(wrong, t).item() > 0.9
    assert sigmoid_focal_loss(wrong, t).item() > 1.0
    # focal at logit 0: alpha-weighted 0.25 * log 2 on positives, 0.75 * 0.25 * log 2 negatives
    z = torch.zeros(1, 8, 8)
    ln2 = torch.log(torch.tensor(2.0)).item()
    pos, neg = 16, 48
    want = (pos * 0.25 * 0.25 * ln2 + neg * 0.75 * 0.25 * ln2) / 64
    assert abs(sigmoid_focal_loss(z, t).item() - want) < 1e-6


def test_iou_target_and_min_loss_rule():
    t = torch.zeros(1, 8, 8)
    t[:, :4] = 1  # top half
    half = torch.full((8, 8), -10.0)
    half[:2] = 10  # predicts a quarter: IoU 0.5
    assert abs(mask_iou(half[None], t).item() - 0.5) < 1e-6
    good = (t[0] * 2 - 1) * 10
    logits = torch.stack([half, good, -good])[None]  # (M=1, K=3, 8, 8)
    iou_pred = torch.tensor([[0.2, 0.7, 0.1]], requires_grad=True)
    logits.requires_grad_(True)
    out = mask_losses(logits, iou_pred, t)
    assert abs(out["iou"].item() - 1.0) < 1e-6  # the best output (index 1) is perfect
    assert abs(out["loss_iou"].item() - 0.3 ** 2) < 1e-6
    total_loss(out["loss_mask"] + out["loss_iou"], torch.tensor(0.0), 2.5).backward()
    assert logits.grad[0, 0].abs().sum() == 0 and logits.grad[0, 2].abs().sum() == 0
    assert iou_pred.grad[0, 1] != 0 and iou_pred.grad[0, 0] == 0
