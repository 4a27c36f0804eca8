"""EViT and Evo-ViT on SAM: the paper's FLOP column, parity with SAM at keep ratio 1, strict
SAM checkpoints, gradients, and the drop-in predictor (the per-token oracle is in
test_pruning_oracle.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything import SamAutomaticMaskGenerator, SamPredictor

from blsam import CheckpointError, blsam_model_registry, build_vanilla_sam
from blsam.flops import count_gflops
from blsam.spec_tables import layer_table, paper_gflops
from blsam.specs import PRUNING_MODELS, TEACHER_OF, get_spec
from blsam.testing import randomize_, sam_with_meta_encoder
from blsam.train.distill import enable_grad_checkpointing

TINY = ("tiny_evit", "tiny_evovit")

# paper Table 2 GFLOPs (paper convention: SAM with one point prompt)
PAPER = {"evit_b": 216.4, "evovit_b": 266.0, "evit_h": 1597.2, "evovit_h": 1840.5}


@pytest.mark.parametrize("name", list(PAPER))
def test_paper_flops_within_one_percent(name):
    gf = count_gflops(sam_with_meta_encoder(name), "paper")
    assert abs(gf - PAPER[name]) / PAPER[name] < 0.01, gf


def test_registry_entries():
    assert set(PRUNING_MODELS) == {"evit_b", "evit_h", "evovit_b", "evovit_h", *TINY}
    for name in PRUNING_MODELS:
        spec = get_spec(name)
        assert spec.default_keep_ratio == 0.5 and not spec.is_blvit
        assert TEACHER_OF[name] == {"b": "vit_b", "h": "vit_h", "tiny": "tiny_vit"}[spec.family]
        assert spec.test_only == name.startswith("tiny")
    assert "k = 81 of 196" in layer_table("evit_b") and "cut" in layer_table("evit_b")
    assert "k = 98 of 196" in layer_table("evovit_h")
    assert paper_gflops("tiny_evit", 256) < paper_gflops("tiny_evit", 256, 1.0)


FULL_WIDTH = [pytest.param(n, marks=pytest.mark.slow) for n in ("evit_b", "evovit_b")]


@pytest.mark.parametrize("name", [*TINY, *FULL_WIDTH])
def test_keep_all_matches_official_sam(name, request):
    """keep ratio 1 keeps every slot: the kept-token path must be SAM's forward."""
    ckpt = request.getfixturevalue("tiny_sam_ckpt" if name in TINY else "sam_vit_b_ckpt")
    ref = build_vanilla_sam(TEACHER_OF[name], ckpt, img_size=256).image_encoder
    enc = blsam_model_registry[name](sam_checkpoint=ckpt, keep_ratio=1.0,
                                     img_size=256).image_encoder
    assert list(enc.state_dict()) == list(ref.state_dict())
    x = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        y_ref = ref(x)
        assert (enc(x) - y_ref).abs().max().item() <= 1e-4
        enc.keep_ratio = 0.5  # and pruning really changes the result
        assert (enc(x) - y_ref).abs().max().item() > 1e-3
    assert enc.last_routing[0].mask.float().mean() < 1


def test_checkpoints_load_strictly(tiny_sam_ckpt, tmp_path):
    sam = blsam_model_registry["tiny_evit"](sam_checkpoint=tiny_sam_ckpt, img_size=256)
    path = tmp_path / "evit.pth"
    torch.save({"model": sam.state_dict(), "step": 2}, path)  # a training checkpoint
    again = blsam_model_registry["tiny_evovit"](checkpoint=path, img_size=256)
    assert all(torch.equal(a, b) for a, b in zip(sam.state_dict().values(),
                                                 again.state_dict().values()))
    bl = blsam_model_registry["tiny_bl"](sam_checkpoint=tiny_sam_ckpt, img_size=256)
    torch.save(bl.state_dict(), tmp_path / "bl.pth")
    with pytest.raises(CheckpointError, match="bLViT-SAM"):
        blsam_model_registry["tiny_evit"](sam_checkpoint=tmp_path / "bl.pth", img_size=256)
    with pytest.raises(ValueError, match="not both"):
        blsam_model_registry["tiny_evit"](checkpoint=path, sam_checkpoint=path)
    with pytest.raises(ValueError, match="padding-aware"):
        blsam_model_registry["tiny_evit"](skip_padding=True)
    with pytest.raises(ValueError, match="keep_ratio"):
        sam.image_encoder.keep_ratio = 0.0


@pytest.mark.parametrize("name", TINY)
def test_gradient_reaches_every_parameter(name):
    torch.manual_seed(0)  # 8x8 tokens, one window: k = 16 of 64 real tokens
    enc = randomize_(blsam_model_registry[name](img_size=128, keep_ratio=0.25).image_encoder)
    enc.train()
    x = torch.randn(1, 3, 128, 128)
    feats = enc(x)
    assert enc.last_routing[0].mask.float().mean() < 1
    w = torch.randn_like(feats)
    (feats * w).sum().backward()
    grads = {}
    for n, p in enc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        assert p.grad.abs().sum() > 0, f"zero gradient for {n}"
        grads[n], p.grad = p.grad, None
    enable_grad_checkpointing(enc)  # blsam-train --grad-checkpoint: the same gradients
    (enc(x) * w).sum().backward()
    for n, p in enc.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], msg=n)


def test_predictor_runs(tiny_sam_ckpt, photo):
    sam = blsam_model_registry["tiny_evovit"](sam_checkpoint=tiny_sam_ckpt, img_size=256)
    predictor = SamPredictor(sam)
    predictor.set_image(photo)
    h, w = photo.shape[:2]
    masks, scores, _ = predictor.predict(point_coords=np.array([[w // 2, h // 3]]),
                                         point_labels=np.array([1]), multimask_output=True)
    assert masks.shape == (3, h, w) and np.isfinite(scores).all()
    assert [s.after_layer for s in sam.image_encoder.last_routing] == [2, 4]
    gen = SamAutomaticMaskGenerator(sam, points_per_side=2, pred_iou_thresh=0.0,
                                    stability_score_thresh=0.0)
    assert all(a["segmentation"].shape == (128, 128) for a in gen.generate(
        photo[::4, ::4].copy()))
