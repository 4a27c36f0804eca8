"""bLViT-SAM as a drop-in for segment_anything's predictor and mask generator; checkpoints."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything import SamAutomaticMaskGenerator, SamPredictor

from blsam import CheckpointError, blsam_model_registry
from blsam.testing import randomize_

IMG = 256


@pytest.fixture(scope="module")
def tiny_blsam(tiny_sam_ckpt):
    sam = blsam_model_registry["tiny_bl"](sam_checkpoint=tiny_sam_ckpt, img_size=IMG)
    randomize_(sam.image_encoder, seed=2, fusion=True, positions=False)
    return sam


def test_predictor_point_and_box(tiny_blsam, photo):
    predictor = SamPredictor(tiny_blsam)
    predictor.set_image(photo)
    assert predictor.features.shape == (1, 256, IMG // 16, IMG // 16)
    h, w = photo.shape[:2]
    masks, scores, logits = predictor.predict(
        point_coords=np.array([[w // 2, h // 3]]), point_labels=np.array([1]), multimask_output=True
    )
    assert masks.shape == (3, h, w) and masks.dtype == bool
    assert scores.shape == (3,) and np.isfinite(scores).all()
    masks, scores, _ = predictor.predict(box=np.array([50, 40, 300, 400]), multimask_output=False)
    assert masks.shape == (1, h, w)
    routed = predictor.model.image_encoder.last_routing
    assert len(routed) == 2 and routed[0]["mask"].any()


def test_automatic_mask_generator_runs(tiny_blsam, photo):
    gen = SamAutomaticMaskGenerator(
        tiny_blsam, points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0
    )
    anns = gen.generate(photo[::2, ::2].copy())
    assert isinstance(anns, list)
    for a in anns:
        assert a["segmentation"].shape == (256, 256)


def test_checkpoint_round_trip(tiny_blsam, tmp_path):
    path = tmp_path / "tiny_blsam.pth"
    torch.save(tiny_blsam.state_dict(), path)
    loaded = blsam_model_registry["tiny_bl"](checkpoint=path, img_size=IMG)
    x = torch.randn(1, 3, IMG, IMG)
    with torch.no_grad():
        assert torch.equal(loaded.image_encoder(x), tiny_blsam.image_encoder(x))
    # a training checkpoint ({"model": ..., ...}) with DDP prefixes loads as well
    wrapped = {"model": {f"module.{k}": v for k, v in tiny_blsam.state_dict().items()}, "step": 3}
    torch.save(wrapped, tmp_path / "train.pth")
    again = blsam_model_registry["tiny_bl"](checkpoint=tmp_path / "train.pth", img_size=IMG)
    with torch.no_grad():
        assert torch.equal(again.image_encoder(x), tiny_blsam.image_encoder(x))


def test_sam_checkpoint_initialises_p_blocks(tiny_sam_ckpt):
    sd = torch.load(tiny_sam_ckpt, weights_only=True)
    sam = blsam_model_registry["tiny_bl"](sam_checkpoint=tiny_sam_ckpt)
    own = sam.state_dict()
    for k in ("image_encoder.blocks.2.attn.qkv.weight", "image_encoder.blocks.5.mlp.lin2.bias",
              "image_encoder.neck.2.weight", "mask_decoder.iou_token.weight",
              "prompt_encoder.point_embeddings.0.weight", "image_encoder.pos_embed"):
        assert torch.equal(own[k], sd[k]), k


def test_wrong_variant_checkpoint_is_clear(tiny_sam_ckpt, monkeypatch):
    import sys

    bb = sys.modules["blsam.build_blsam"]
    with torch.device("meta"):  # a ViT-B-shaped state dict without writing 375 MB
        vit_b_sd = blsam_model_registry["vit_b"]().state_dict()
    monkeypatch.setattr(bb, "_sam_with_encoder", lambda *a: pytest.fail("built before checking"))
    for name in ("h_b", "vit_h"):  # refused before anything is built
        with pytest.raises(CheckpointError, match=r"Tiny ViT \(tests\).*needs SAM ViT-H"):
            blsam_model_registry[name](tiny_sam_ckpt if name == "vit_h" else None,
                                       sam_checkpoint=None if name == "vit_h" else tiny_sam_ckpt)
    monkeypatch.setattr(bb, "read_state_dict", lambda path, what="": vit_b_sd)
    with pytest.raises(CheckpointError, match="ViT-B image encoder.*needs SAM Tiny ViT"):
        blsam_model_registry["tiny_bl"](sam_checkpoint="sam_vit_b_01ec64.pth")


@pytest.mark.slow
def test_b_t_drop_in_from_vit_b_checkpoint(sam_vit_b_ckpt, photo):
    """Full width: b_t initialised from a ViT-B SAM checkpoint runs in SamPredictor."""
    sam = blsam_model_registry["b_t"](sam_checkpoint=sam_vit_b_ckpt, img_size=IMG)
    sd = torch.load(sam_vit_b_ckpt, weights_only=True)
    assert torch.equal(sam.state_dict()["image_encoder.blocks.11.mlp.lin2.bias"],
                       sd["image_encoder.blocks.11.mlp.lin2.bias"])
    predictor = SamPredictor(sam)
    predictor.set_image(photo)
    masks, scores, _ = predictor.predict(point_coords=np.array([[200, 150]]),
                                         point_labels=np.array([1]))
    assert masks.shape == (3, *photo.shape[:2]) and np.isfinite(scores).all()
    assert len(predictor.model.image_encoder.last_routing) == 4


def test_vanilla_checkpoint_as_blsam_checkpoint_is_clear(tiny_sam_ckpt):
    with pytest.raises(CheckpointError, match="sam_checkpoint="):
        blsam_model_registry["tiny_bl"](checkpoint=tiny_sam_ckpt, img_size=64)


def test_missing_and_unexpected_keys_are_listed(tiny_blsam, tmp_path):
    sd = dict(tiny_blsam.state_dict())
    sd.pop("image_encoder.blocks.2.e_block.attn.qkv.weight")
    sd["image_encoder.extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as e:
        blsam_model_registry["tiny_bl"](checkpoint=tmp_path / "bad.pth", img_size=IMG)
    msg = str(e.value)
    assert "missing keys (1): image_encoder.blocks.2.e_block.attn.qkv.weight" in msg
    assert "unexpected keys (1): image_encoder.extra.weight" in msg


def test_unreadable_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        blsam_model_registry["tiny_bl"](checkpoint=tmp_path / "nope.pth", img_size=64)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="could not read"):
        blsam_model_registry["tiny_bl"](checkpoint=tmp_path / "junk.pth", img_size=64)
    torch.save({"a": 1}, tmp_path / "dict.pth")
    with pytest.raises(CheckpointError, match="not a state dict"):
        blsam_model_registry["tiny_bl"](checkpoint=tmp_path / "dict.pth", img_size=64)


def test_registry_contract():
    assert set(blsam_model_registry) >= {"b_t", "h_b", "vit_b", "vit_l", "vit_h", "default"}
    assert blsam_model_registry["default"] is blsam_model_registry["h_b"]
    from segment_anything.modeling import Sam

    sam = blsam_model_registry["tiny_vit"](img_size=64)
    assert type(sam) is Sam
