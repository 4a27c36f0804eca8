"""``blsam-train --init sam|random``: the P-blocks from SAM's checkpoint (the paper's
"Pretrain" step) or from scratch; recorded in the run, never resumed as the other."""
from __future__ import annotations

import os

import pytest
import torch
from train_checks import tiny_train_args

from blsam.build_blsam import blsam_model_registry, reinit_image_encoder_
from blsam.checkpoint import read_state_dict
from blsam.train.tiny_sa1b import write_tiny_sa1b

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _args(data, ckpt, out, *extra):
    return tiny_train_args("tiny_bl", data, ckpt, out, "--max-steps", "1", *extra)


def test_reinit_replaces_the_encoder_only_and_is_seeded(tiny_sam_ckpt):
    sam_sd = read_state_dict(tiny_sam_ckpt)
    models = []
    for _ in range(2):
        sam = blsam_model_registry["tiny_bl"](sam_checkpoint=tiny_sam_ckpt, img_size=64)
        torch.manual_seed(3)
        models.append(reinit_image_encoder_(sam, "tiny_bl", img_size=64).state_dict())
    a, b = models
    assert all(torch.equal(a[k], b[k]) for k in a)  # the torch seed decides
    for k, v in sam_sd.items():
        if k.startswith(("prompt_encoder.", "mask_decoder.")):
            assert torch.equal(a[k], v), k  # SAM's head kept
    loaded = [k for k in sam_sd if k.startswith("image_encoder.") and k in a  # drawn weights
              and a[k].shape == sam_sd[k].shape and sam_sd[k].dim() >= 2]
    assert loaded and not any(torch.equal(a[k], sam_sd[k]) for k in loaded)
    assert a["image_encoder.pos_embed"].abs().sum() > 0  # not SAM's zero placeholder


def test_init_random_is_recorded_and_not_resumed_as_sam(tiny_sam_ckpt, tmp_path, capsys):
    from train_checks import train

    from blsam.tools.train import cli

    data = tmp_path / "data"
    write_tiny_sa1b(data, num_shards=1, images_per_shard=2, size=96, fmt="tar")
    train(_args(data, tiny_sam_ckpt, tmp_path / "r", "--init", "random"))
    ck = torch.load(tmp_path / "r" / "last.pth", weights_only=True)
    assert ck["run"]["init"] == "random"
    capsys.readouterr()
    rc = cli(["--config", os.path.join(ROOT, "configs", "distill_b_t.yaml"), "--model", "tiny_bl",
              "--data", str(data), "--data-fraction", "1", "--sam-checkpoint", tiny_sam_ckpt,
              "--output-dir", str(tmp_path / "r"), "--img-size", "64", "--batch-size", "1",
              "--num-workers", "0", "--no-progress", "--val-every", "0", "--masks-per-image",
              "2", "--prompt-types", "box", "--max-steps", "2", "--resume", "auto"])
    err = capsys.readouterr().err
    assert rc == 2 and "init" in err, err


@pytest.mark.parametrize("extra", [["--init", "random", "--init-checkpoint", __file__],
                                   ["--init", "scratch"]])
def test_init_bad_combinations_are_one_line(tiny_sam_ckpt, tmp_path, capsys, extra):
    from blsam.tools.train import cli

    rc = cli(["--model", "tiny_bl", "--data", str(tmp_path), "--sam-checkpoint", tiny_sam_ckpt,
              "--output-dir", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "error" in err[-1] and "init" in err[-1], err
    assert "Traceback" not in "\n".join(err)
