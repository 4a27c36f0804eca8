"""Issue 11: resume cannot silently change the run (refused with every difference named, or
remapped by images seen when asked), per-rank counters, and user errors of tools/train.py as
one line with exit code 2 (a bLViT checkpoint given as --sam-checkpoint says what it is)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from blsam.train.resume import remap_position, restore_counters
from blsam.train.tiny_sa1b import write_tiny_sa1b

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_resume")
    write_tiny_sa1b(root, num_shards=1, images_per_shard=2, size=96, fmt="tar")
    return root


def _argv(data, ckpt, out, *extra):
    return ["--config", os.path.join(ROOT, "configs", "distill_b_t.yaml"), "--model", "tiny_bl",
            "--data", str(data),
            "--data-fraction", "1", "--sam-checkpoint", ckpt, "--output-dir", str(out),
            "--img-size", "64", "--num-workers", "0", "--log-every", "1", "--no-progress",
            "--val-every", "0", "--masks-per-image", "2", "--prompt-types", "box",
            "--max-steps", "3", "--warmup-steps", "0", *extra]


def _cli(argv, capsys):
    from blsam.tools.train import cli

    rc = cli(argv)
    err = capsys.readouterr().err
    return rc, [ln for ln in err.splitlines() if ln.startswith("error:")], err


def test_resume_refuses_other_run_then_remaps_by_images_seen(data, tiny_sam_ckpt, tmp_path,
                                                             capsys, caplog):
    from train_checks import train

    from blsam.tools.train import parse_args

    out = tmp_path / "run"
    part = train(parse_args(_argv(data, tiny_sam_ckpt, out, "--batch-size", "2",
                                  "--stop-after", "1")))
    assert part["stopped"]
    ck = torch.load(out / "last.pth", weights_only=True)
    assert ck["run"]["world_size"] == 1 and ck["run"]["batch_size"] == 2
    assert ck["run"]["total_steps"] == 3 and ck["run"]["images"] == 2
    assert ck["images_seen"] == 2 and ck["counters"]["skipped_read"] == [0]

    # another per-process batch, accumulation and seed: refused, every difference named
    rc, lines, err = _cli(_argv(data, tiny_sam_ckpt, out, "--batch-size", "1", "--accum-steps",
                                "2", "--seed", "1", "--resume", "auto"), capsys)
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err
    for d in ("batch_size 2 -> 1", "accum_steps 1 -> 2", "seed 0 -> 1", "--resume-remap"):
        assert d in lines[0]
    # a checkpoint of another world size (as 8 GPUs would have written it)
    ck8 = dict(ck, run=dict(ck["run"], world_size=8))
    torch.save(ck8, tmp_path / "w8.pth")
    rc, lines, _ = _cli(_argv(data, tiny_sam_ckpt, out, "--batch-size", "2", "--resume",
                              str(tmp_path / "w8.pth")), capsys)
    assert rc == 2 and "world_size 8 -> 1" in lines[0]
    # a different model size can never be remapped
    rc, lines, _ = _cli(_argv(data, tiny_sam_ckpt, out, "--batch-size", "2", "--img-size",
                              "128", "--resume", "auto", "--resume-remap"), capsys)
    assert rc == 2 and "img_size 64 -> 128" in lines[0] and "another model" in lines[0]

    # asked explicitly: continue by images seen (2 images = 2 steps of batch 1), with a warning
    remapped = train(parse_args(_argv(data, tiny_sam_ckpt, out, "--batch-size", "1",
                                      "--resume", "auto", "--resume-remap")))
    assert "--resume-remap" in caplog.text and "batch_size 2 -> 1" in caplog.text
    assert [h["step"] for h in remapped["history"]] == [3]
    from blsam.train.distill import lr_lambda
    assert remapped["history"][0]["lr"] == pytest.approx(5e-4 * lr_lambda(0, 3, 0.01)(2))
    ck = torch.load(out / "last.pth", weights_only=True)
    assert ck["step"] == 3 and ck["images_seen"] == 3 and ck["run"]["batch_size"] == 1
    assert [json.loads(ln)["step"] for ln in open(out / "metrics.jsonl")] == [1, 3]


def test_counters_are_per_rank_and_summed():
    """Rank 0's count restored on every rank over-counted after a resume under DDP."""
    ck = {"counters": {"skipped_read": [3, 5], "bad_ann": [1, 0], "large_ann": [2, 2]}}
    got = [restore_counters(ck, r, 2, exact=True) for r in range(2)]
    assert [g["skipped_read"] for g in got] == [3, 5]
    assert sum(g["bad_ann"] for g in got) == 1 and sum(g["large_ann"] for g in got) == 4
    remap = [restore_counters(ck, r, 4, exact=False) for r in range(4)]
    assert [g["skipped_read"] for g in remap] == [8, 0, 0, 0]
    old = [restore_counters({"skipped_read": 7}, r, 2, exact=True) for r in range(2)]
    assert [g["skipped_read"] for g in old] == [7, 0]


def test_remap_position_keeps_images_and_epoch_fraction():
    ck = {"step": 10, "epoch": 2, "batch_in_epoch": 5, "batches_per_epoch": 10,
          "images_seen": 640}
    pos = remap_position(ck, global_batch=128, batches_per_epoch=4)
    assert pos == {"step": 5, "epoch": 2, "batch_in_epoch": 2, "images_seen": 640}


def test_user_errors_are_one_line_exit_2(data, tiny_sam_ckpt, tmp_path, capsys):
    from blsam import blsam_model_registry
    from blsam.checkpoint import CheckpointError

    out = str(tmp_path / "o")
    bad = {
        "--batch-size must be >= 1": ["--batch-size", "0"],
        "--data-fraction must be in (0, 1]": ["--data-fraction", "1.5"],
        "--img-size must be a positive multiple of 16": ["--img-size", "65"],
        "--max-mask-fraction": ["--max-mask-fraction", "0"],
        "--resume-remap needs --resume": ["--resume-remap"],
        "unrecognized arguments": ["--no-such-flag"],
        "does not exist": ["--data", str(tmp_path / "missing")],
        "--trainable": ["--trainable", "decoder"],
    }
    for want, extra in bad.items():
        rc, lines, err = _cli(_argv(data, tiny_sam_ckpt, out, *extra), capsys)
        assert rc == 2 and len(lines) == 1 and want in lines[0], (want, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err

    # a trained bLViT-SAM given as the SAM checkpoint: said what it is, before any build
    blt = tmp_path / "blsam_b_t.pth"
    torch.save(blsam_model_registry["tiny_bl"](img_size=64).state_dict(), blt)
    rc, lines, err = _cli(_argv(data, str(blt), out), capsys)
    assert rc == 2 and len(lines) == 1
    assert "trained bLViT-SAM checkpoint (tiny_bl" in lines[0] and "--checkpoint" in lines[0]
    with pytest.raises(CheckpointError, match="bLViT-SAM checkpoint"):  # the library too
        blsam_model_registry["tiny_vit"](checkpoint=str(blt), img_size=64)
    # garbage and pickled objects: our words, not torch's "please file an issue"
    (tmp_path / "garbage.pth").write_bytes(b"this is not a checkpoint" * 10)
    import pickle
    with open(tmp_path / "objects.pth", "wb") as f:
        pickle.dump({"model": object()}, f)
    import warnings
    for name, want in (("garbage.pth", "not a PyTorch checkpoint"),
                       ("objects.pth", "Python objects other than tensors")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rc, lines, err = _cli(_argv(data, str(tmp_path / name), out), capsys)
        assert rc == 2 and len(lines) == 1 and want in lines[0], err
        assert "file an issue" not in err and "Traceback" not in err
        assert not [w for w in caught if "file an issue" in str(w.message)]
    assert not os.path.exists(out)  # nothing was written for a refused run
