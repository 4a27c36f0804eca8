"""The training step decodes all images' masks in one prompt-encoder + decoder call per prompt
form and iteration; it must give the same losses, metrics, gradients and interactive clicks as
a plain per-image loop over segment-anything's own ``MaskDecoder`` (the oracle below)."""
from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from blsam import blsam_model_registry
from blsam.train.distill import DistillModel, click_schedule, error_click, set_trainable
from blsam.train.losses import feature_loss, mask_losses, real_positions, total_loss

IMG = 64
LOW = IMG // 4
KEYS = ("loss", "loss_mask", "loss_iou", "iou", "iou_final", "n_masks", "loss_fd", "cos_sim")


@pytest.fixture(scope="module")
def sam(tiny_sam_ckpt):
    torch.manual_seed(0)
    model = blsam_model_registry["tiny_bl"](sam_checkpoint=tiny_sam_ckpt, img_size=IMG)
    set_trainable(model, "all")
    return model


@pytest.fixture(scope="module")
def sam64(sam):
    """The same model in float64 (SAM's prompt encoder casts coordinates to float32 for its
    Fourier features; here to float64)."""
    model = copy.deepcopy(sam).double()
    pe = model.prompt_encoder.pe_layer
    encode = pe._pe_encoding
    pe._pe_encoding = lambda coords: encode(coords.double())
    return model


def _batch(specs: list[tuple[str, int, int]], seed: int = 0) -> dict[str, Any]:
    """Images of random rectangles: (kind, mask count, clicks per mask) per image."""
    g = torch.Generator().manual_seed(seed)
    b: dict[str, Any] = {k: [] for k in ("kind", "masks", "boxes", "points", "labels", "seed")}
    for kind, m, n_pts in specs:
        masks, boxes = torch.zeros(m, LOW, LOW), torch.zeros(m, 4)
        points = torch.zeros(m, n_pts, 2)
        for j in range(m):
            y0, x0 = torch.randint(0, LOW - 4, (2,), generator=g).tolist()
            hh, ww = torch.randint(3, 9, (2,), generator=g).tolist()
            y1, x1 = min(y0 + hh, LOW), min(x0 + ww, LOW)
            masks[j, y0:y1, x0:x1] = 1
            s = IMG // LOW
            boxes[j] = torch.tensor([x0, y0, x1, y1]) * s + torch.randn(4, generator=g) * 2
            points[j, :, 0] = torch.randint(x0 * s, x1 * s, (n_pts,), generator=g)
            points[j, :, 1] = torch.randint(y0 * s, y1 * s, (n_pts,), generator=g)
        b["kind"].append(kind)
        b["masks"].append(masks)
        b["boxes"].append(boxes if kind == "box" else None)
        b["points"].append(None if kind == "box" else points)
        b["labels"].append(None if kind == "box" else torch.ones(m, n_pts, dtype=torch.long))
        b["seed"].append(int(torch.randint(0, 2 ** 62, (1,), generator=g)))
    b["hw"] = [(IMG, IMG - 16 * (i % 2)) for i in range(len(specs))]
    b["image"] = torch.randn(len(specs), 3, IMG, IMG, generator=g)
    b["teacher"] = torch.randn(len(specs), 256, IMG // 16, IMG // 16, generator=g)
    return b


def _oracle(model: DistillModel, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """DistillModel.forward as a per-image loop calling upstream ``sam.mask_decoder``."""
    sam, iters, images = model.sam, model.prompt_iters, batch["image"]
    emb = sam.image_encoder(images)
    valid = real_positions(batch["hw"], emb.shape[-1], IMG // emb.shape[-1])
    out = feature_loss(emb, batch["teacher"], valid)
    image_pe = sam.prompt_encoder.get_dense_pe()
    sums = {k: torch.zeros(()) for k in ("loss_mask", "loss_iou", "iou", "iou_final")}
    n = 0
    for i, targets in enumerate(batch["masks"]):
        if targets.shape[0] == 0:
            continue
        kind, seed = batch["kind"][i], batch["seed"][i]
        boxes = batch["boxes"][i] if kind == "box" else None
        points = None if kind == "box" else (batch["points"][i], batch["labels"][i])
        clicks = click_schedule(iters, seed)
        gen = torch.Generator().manual_seed(seed)
        mask_in = None
        for it in range(iters):
            sparse, dense = sam.prompt_encoder(points=points, boxes=boxes, masks=mask_in)
            logits, iou_pred = sam.mask_decoder(
                image_embeddings=emb[i:i + 1], image_pe=image_pe, sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense, multimask_output=(kind == "point" and it == 0))
            r = mask_losses(logits, iou_pred, targets)
            sums["loss_mask"] = sums["loss_mask"] + r["loss_mask"] / iters
            sums["loss_iou"] = sums["loss_iou"] + r["loss_iou"] / iters
            if it == 0:
                sums["iou"] = sums["iou"] + r["iou"]
            if it == iters - 1:
                sums["iou_final"] = sums["iou_final"] + r["iou"]
                break
            h, w = logits.shape[-2:]
            mask_in = logits.gather(1, r["best"][:, None, None, None].expand(-1, 1, h, w)).detach()
            if clicks[it]:
                xy, lab = error_click(mask_in, targets, gen, IMG // h)
                points = (xy, lab) if points is None else (
                    torch.cat([points[0], xy], 1), torch.cat([points[1], lab], 1))
        n += targets.shape[0]
    out["loss"] = total_loss((sums["loss_mask"] + sums["loss_iou"]) / n, out["loss_fd"],
                             model.lambda_fd)
    for k in ("loss_mask", "loss_iou", "iou", "iou_final"):
        out[k] = sums[k].detach() / n
    out["n_masks"] = torch.tensor(float(n))
    return out


def _run(sam, fn, batch) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    sam.zero_grad(set_to_none=True)
    out = fn(batch)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in sam.named_parameters() if p.grad is not None}
    return {k: out[k].item() for k in KEYS}, grads


def _forms(batch: dict[str, Any], iters: int) -> int:
    """Decoder calls expected: distinct (multimask, box, click count) per iteration."""
    forms: list[set] = [set() for _ in range(iters)]
    for i, kind in enumerate(batch["kind"]):
        if batch["masks"][i].shape[0] == 0:
            continue
        clicks = click_schedule(iters, batch["seed"][i]) + [False]
        n_pts = 0 if kind == "box" else batch["points"][i].shape[1]
        for it in range(iters):
            forms[it].add((kind == "point" and it == 0, kind == "box", n_pts))
            n_pts += clicks[it]
    return sum(len(f) for f in forms)


# one click (multimask), a box, no masks, 2 clicks, another box and another click: with 5
# iterations the random click-less iteration differs per image, so the groups change
SPECS = [("point", 3, 1), ("box", 2, 0), ("point", 0, 1), ("points", 4, 2), ("box", 5, 0),
         ("point", 2, 1)]


@pytest.mark.parametrize("dtype,iters", [("float64", 1), ("float64", 3),
                                         pytest.param("float64", 5, marks=pytest.mark.slow),
                                         ("float32", 3)])
def test_batched_equals_per_image_oracle(sam, sam64, dtype, iters):
    """In float64 the gradients agree to ~1e-13 (the losses are computed in float32 in both);
    in float32 they differ by summation order, up to ~2e-4 of a tensor's largest entry (the
    decoder's MLP weights sum over every mask's 16^2 + 8 tokens)."""
    model_sam, dt = (sam64, torch.float64) if dtype == "float64" else (sam, torch.float32)
    batch = _batch(SPECS, seed=iters)
    for k in ("image", "teacher"):
        batch[k] = batch[k].to(dt)
    for k in ("boxes", "points"):
        batch[k] = [None if x is None else x.to(dt) for x in batch[k]]
    model = DistillModel(model_sam, 2.5, prompt_iters=iters)
    calls: list[int] = []
    hook = model_sam.mask_decoder.transformer.register_forward_hook(
        lambda mod, args, out: calls.append(args[0].shape[0]))
    try:
        got, g_got = _run(model_sam, lambda b: model(b["image"], b, b["teacher"]), batch)
    finally:
        hook.remove()
    assert len(calls) == _forms(batch, iters) and sum(calls) == 16 * iters
    want, g_want = _run(model_sam, lambda b: _oracle(model, b), batch)
    assert want["n_masks"] == 16 and want["loss_mask"] > 0
    assert got == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert set(g_got) == set(g_want) and any(n.startswith("mask_decoder.") for n in g_got)
    for n in g_want:
        if dtype == "float64":
            torch.testing.assert_close(g_got[n], g_want[n], rtol=1e-6, atol=1e-10, msg=n)
        else:  # (attention k_proj biases get float noise only: their exact gradient is 0)
            atol = 1e-6 + 1e-3 * g_want[n].abs().max().item()
            torch.testing.assert_close(g_got[n], g_want[n], rtol=1e-4, atol=atol, msg=n)


def test_decoder_runs_once_per_prompt_form_and_iteration(sam):
    batch = _batch([("point", 3, 1), ("box", 2, 0), ("point", 2, 1), ("box", 4, 0),
                    ("box", 0, 0)])
    calls: list[int] = []
    hook = sam.mask_decoder.transformer.register_forward_hook(
        lambda mod, args, out: calls.append(args[0].shape[0]))
    try:
        out = DistillModel(sam, 2.5, prompt_iters=3)(batch["image"], batch, batch["teacher"])
    finally:
        hook.remove()
    # points, boxes x 3 iterations (no click-less middle iteration below 4 iterations)
    assert calls == [5, 6] * 3 and out["n_masks"].item() == 11


def test_no_masks_keeps_decoder_in_graph(sam):
    batch = _batch([("point", 0, 1), ("box", 0, 0)])
    sam.zero_grad(set_to_none=True)
    out = DistillModel(sam, 2.5)(batch["image"], batch, batch["teacher"])
    out["loss"].backward()
    assert out["n_masks"].item() == 0 and out["loss_mask"].item() == 0
    assert all(p.grad is not None for n, p in sam.named_parameters()
               if n.startswith("mask_decoder."))
