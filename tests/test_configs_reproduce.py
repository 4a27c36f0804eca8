"""The reproduction configs (configs/table2, configs/ablation): each parses as blsam-train
options and builds its model on the meta device; the ablation path adds one thing per step."""
from __future__ import annotations

import pytest

from blsam.specs import ABLATION_ORDER
from blsam.testing import sam_with_meta_encoder
from blsam.utils.config import packaged_configs

TRAIN_CONFIGS = [c for c in packaged_configs() if c.startswith(("table2/", "ablation/"))]


def _parse(name: str, tmp_path):
    from blsam.tools.train import parse_args

    return parse_args(["--config", name, "--data", str(tmp_path), "--sam-checkpoint",
                       str(tmp_path / "sam.pth"), "--output-dir", str(tmp_path / "out")])


def test_every_trainable_row_has_a_config():
    rows = {"b_t", "h_b", "evit_b", "evovit_b", "evit_h", "evovit_h"}
    assert {c.split("/")[1] for c in TRAIN_CONFIGS if c.startswith("table2/")} == rows
    assert len([c for c in TRAIN_CONFIGS if c.startswith("ablation/")]) == 11


@pytest.mark.parametrize("name", TRAIN_CONFIGS)
def test_config_parses_and_builds_on_meta(name, tmp_path):
    args = _parse(name, tmp_path)
    assert args.epochs == 10 and args.batch_size == 8 and args.data_fraction == 0.02
    assert args.lr == 5e-4  # the paper's recipe, every row
    sam = sam_with_meta_encoder(args.model, keep_ratio=args.keep_ratio, img_size=args.img_size)
    assert sam.image_encoder.keep_ratio == args.keep_ratio


def test_ablation_path_adds_one_component_per_step(tmp_path):
    steps = sorted(c for c in TRAIN_CONFIGS if c.split("/")[1][0].isdigit())
    got = [(a.model, a.init, a.lambda_fd) for a in (_parse(s, tmp_path) for s in steps)]
    final = _parse("table2/b_t", tmp_path)
    got.append((final.model, final.init, final.lambda_fd))
    assert got == [(ABLATION_ORDER[0], "random", 0.0), (ABLATION_ORDER[1], "random", 0.0),
                   (ABLATION_ORDER[2], "random", 0.0), ("b_t", "random", 0.0),
                   ("b_t", "sam", 0.0), ("b_t", "sam", 2.5)]


def test_trained_early_prune_checkpoint_loads_and_bl_models_still_refuse_sam(tmp_path,
                                                                              tiny_sam_ckpt):
    """The early-prune step has exactly SAM's parameters: its final.pth (SAM-shaped) loads
    as checkpoint=; a model with E-blocks still refuses a vanilla SAM file there."""
    import torch

    from blsam.build_blsam import blsam_model_registry
    from blsam.checkpoint import CheckpointError

    trained = blsam_model_registry["tiny_bl_early_prune"](sam_checkpoint=tiny_sam_ckpt,
                                                           img_size=64)
    with torch.no_grad():
        next(trained.image_encoder.parameters()).add_(1.0)  # "trained"
    path = tmp_path / "final.pth"
    torch.save(trained.state_dict(), path)
    again = blsam_model_registry["tiny_bl_early_prune"](checkpoint=path, img_size=64)
    sd = again.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in trained.state_dict().items())
    with pytest.raises(CheckpointError, match="vanilla SAM checkpoint"):
        blsam_model_registry["tiny_bl"](checkpoint=tiny_sam_ckpt, img_size=64)
