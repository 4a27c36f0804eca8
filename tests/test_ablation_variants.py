"""The Table-3 design steps on SAM (b_t_early_prune -> b_t_eblock -> b_t_predictor -> b_t):
FLOPs pinned on the meta device, drop-in for SamPredictor, gradients to every parameter, and
the early-prune step through blsam-train (2 steps, exact resume)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor
from train_checks import assert_resume_matches_full

from blsam import blsam_model_registry
from blsam.spec_tables import paper_gflops
from blsam.specs import ABLATION_ORDER
from blsam.testing import assert_gradient_reaches_every_parameter, randomize_

TINY = ["tiny_bl_early_prune", "tiny_bl_eblock", "tiny_bl_predictor"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_paper_gflops_pinned_and_rising_along_the_ablation():
    got = [paper_gflops(n) for n in ABLATION_ORDER]
    assert got[:3] == pytest.approx([117.6, 171.0, 171.1], abs=0.05)
    assert got == sorted(got)  # each step adds compute, the last is b_t itself


@pytest.mark.parametrize("name", TINY)
def test_runs_in_sam_predictor(name, photo):
    torch.manual_seed(0)
    sam = randomize_(blsam_model_registry[name](img_size=128), fusion=True).eval()
    predictor = SamPredictor(sam)
    predictor.set_image(photo)
    assert predictor.features.shape == (1, 256, 8, 8)
    h, w = photo.shape[:2]
    masks, scores, _ = predictor.predict(point_coords=np.array([[w // 2, h // 3]]),
                                         point_labels=np.array([1]), multimask_output=True)
    assert masks.shape == (3, h, w) and np.isfinite(scores).all()


@pytest.mark.parametrize("name", TINY)
def test_gradient_reaches_every_parameter(name):
    torch.manual_seed(0)
    enc = randomize_(blsam_model_registry[name](img_size=64).image_encoder, fusion=True).train()
    assert_gradient_reaches_every_parameter(enc, torch.randn(2, 3, 64, 64))


@pytest.mark.slow
def test_early_prune_trains_two_steps_and_resumes_exactly(tiny_sam_ckpt, tmp_path):
    from train_checks import train

    from blsam.tools.train import parse_args
    from blsam.train.tiny_sa1b import write_tiny_sa1b

    def args(out, *extra):
        return parse_args([
            "--config", os.path.join(ROOT, "configs", "distill_b_t.yaml"), "--model",
            "tiny_bl_early_prune", "--data", str(tmp_path / "data"), "--data-fraction", "1",
            "--sam-checkpoint", tiny_sam_ckpt, "--output-dir", str(out), "--img-size", "64",
            "--batch-size", "1", "--num-workers", "0", "--log-every", "1", "--warmup-steps",
            "0", "--no-progress", "--val-every", "0", "--masks-per-image", "2",
            "--prompt-types", "box", "--max-steps", "2", "--lr", "2e-4", *extra])

    write_tiny_sa1b(tmp_path / "data", num_shards=1, images_per_shard=2, size=96, fmt="tar")
    full = train(args(tmp_path / "a", "--save-every", "1", "--keep-last", "2"))
    resumed = train(args(tmp_path / "b", "--resume", str(tmp_path / "a" / "step_0000001.pth")))
    assert_resume_matches_full(tmp_path / "a", tmp_path / "b", full, resumed)
    blsam_model_registry["tiny_bl_early_prune"](checkpoint=tmp_path / "a" / "final.pth",
                                               img_size=64)


def test_early_prune_at_keep_one_is_sam(tiny_sam_ckpt):
    """Every token routed: P-blocks attend among all tokens (SAM's windows and global layers),
    no E-blocks: exactly the teacher (same parameters, SAM's own encoder as the oracle)."""
    from blsam.build_blsam import build_vanilla_sam

    sam = build_vanilla_sam("tiny_vit", tiny_sam_ckpt, img_size=64).eval()
    ours = blsam_model_registry["tiny_bl_early_prune"](sam_checkpoint=tiny_sam_ckpt, img_size=64,
                                                        keep_ratio=1.0).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours.image_encoder(x), sam.image_encoder(x), atol=2e-5,
                                   rtol=1e-4)


@pytest.mark.parametrize("name", TINY)
def test_eval_on_fixtures(name, tiny_sam_ckpt, tmp_path):
    """Through blsam-eval like b_t: a box-prompt LVIS fixture, GFLOPs and keep ratio recorded."""
    import json

    from eval_fixtures import make_tiny_dataset

    from blsam.tools.zero_shot import main, parse_args

    d = make_tiny_dataset(str(tmp_path / "lvis"), "lvis", num_images=1)
    out = main(parse_args(["--model", name, "--sam-checkpoint", tiny_sam_ckpt, "--img-size",
                           "64", "--dataset", "lvis", "--ann-file", d["ann_file"], "--img-dir",
                           d["img_dir"], "--output", str(tmp_path / "out"), "--no-progress",
                           "--prompt", "box"]))
    res = out["results"][0]
    saved = json.load(open(res["outputs"]["json"]))
    assert saved["model"] == name and saved["keep_ratio"] == 0.25
    assert saved["gflops"] > 0 and 0.0 <= res["metrics"]["mIoU"] <= 1.0


def test_ablation_and_paper_flags_refuse_what_means_nothing(capsys):
    """--ablation for a family without design steps, --paper without --table: one line, 2."""
    from blsam.tools import benchmark, zero_shot

    assert benchmark.cli(["--families", "h", "--ablation"]) == 2
    assert zero_shot.cli(["--paper"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "--ablation" in err[0] and "--paper" in err[1], err
