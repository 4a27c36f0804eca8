"""Training loop on a tiny configuration (tiny_bl, 64 px, batch 2, CPU, no workers): the loss goes
down and the student moves toward the teacher, resume is exact, gloo DDP keeps ranks in sync,
the teacher cache replaces the teacher, the final model loads from the registry."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from train_checks import assert_resume_matches_full, train

from blsam import blsam_model_registry
from blsam.checkpoint import read_state_dict
from blsam.train.distill import DistillModel, enable_grad_checkpointing, state_checksum
from blsam.train.tiny_sa1b import write_tiny_sa1b

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMG = "64"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_sam_ckpt):
    """Two shards of 2 images, and a teacher cache for them made by tools/cache_teacher.py."""
    from blsam.tools.cache_teacher import main as cache_main
    from blsam.tools.cache_teacher import parse_args as cache_args

    root = tmp_path_factory.mktemp("tiny")
    write_tiny_sa1b(root / "data", num_shards=2, images_per_shard=2, size=96, fmt="tar")
    cache_main(cache_args(["--data", str(root / "data"), "--data-fraction", "1",
                           "--model", "tiny_bl",
                           "--sam-checkpoint", tiny_sam_ckpt, "--img-size", IMG,
                           "--output", str(root / "cache"), "--num-workers", "0"]))
    return root


def _args(tiny, ckpt, out, *extra):
    from blsam.tools.train import parse_args

    return parse_args([
        "--config", os.path.join(ROOT, "configs", "distill_b_t.yaml"), "--model", "tiny_bl",
        "--data", str(tiny / "data"), "--data-fraction", "1", "--sam-checkpoint", ckpt,
        "--output-dir", str(out), "--img-size", IMG, "--batch-size", "2", "--num-workers", "0",
        "--log-every", "1", "--warmup-steps", "0", "--no-progress", "--val-every", "0", *extra])


def test_cache_matches_teacher(tiny, tiny_sam_ckpt):
    from blsam.train.data import SA1BDataset, select_records

    recs, _ = select_records(str(tiny / "data"))
    ds = SA1BDataset(recs, int(IMG), with_targets=False, teacher_cache=str(tiny / "cache"))
    s = ds[(0, 0)]
    teacher = blsam_model_registry["tiny_vit"](checkpoint=tiny_sam_ckpt, img_size=int(IMG))
    with torch.no_grad():
        ref = teacher.image_encoder(s["image"][None])[0]
    assert s["teacher"].dtype == torch.float16 and s["teacher"].shape == ref.shape
    torch.testing.assert_close(s["teacher"].float(), ref, atol=2e-2, rtol=1e-2)


def test_every_student_parameter_gets_a_gradient(tiny, tiny_sam_ckpt):
    """So DDP can run with find_unused_parameters=False (image_encoder and 'all' minus the
    prompt encoder's unused embeddings)."""
    from blsam.train.data import SA1BDataset, collate, select_records

    sam = blsam_model_registry["tiny_bl"](sam_checkpoint=tiny_sam_ckpt, img_size=int(IMG))
    sam.prompt_encoder.requires_grad_(False)
    recs, _ = select_records(str(tiny / "data"))
    ds = SA1BDataset(recs, int(IMG), prompt_types=["point"], teacher_cache=str(tiny / "cache"))
    batch = collate([ds[(0, 0)], ds[(0, 1)]])
    t_emb = torch.stack(batch["teacher"]).float()
    out = DistillModel(sam, 2.5)(batch["image"], batch, t_emb)
    out["loss"].backward()
    missing = [n for n, p in sam.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    assert all(torch.isfinite(p.grad).all() for p in sam.parameters() if p.grad is not None)
    # activation checkpointing (--grad-checkpoint) gives the same gradients, same names
    grads = {n: p.grad.clone() for n, p in sam.named_parameters() if p.grad is not None}
    names = list(sam.state_dict())
    sam.zero_grad(set_to_none=True)
    enable_grad_checkpointing(sam.image_encoder)
    out2 = DistillModel(sam, 2.5)(batch["image"], batch, t_emb)
    out2["loss"].backward()
    assert list(sam.state_dict()) == names
    torch.testing.assert_close(out2["loss"], out["loss"])
    for n, p in sam.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], atol=1e-5, rtol=1e-4, msg=n)


def test_overfit_loss_down_cos_up_and_final_model_loads(tiny, tiny_sam_ckpt, tmp_path,
                                                        monkeypatch, capsys):
    """Also: validation on the held-out shard moves the right way and ``--val-only`` on
    final.pth reproduces the last validation; ``images_per_s`` leaves save time out."""
    import time

    from blsam.train import checkpointer

    real_save = checkpointer.save_training_checkpoint

    def slow_save(*a, **k):  # a slow disk: 1.5 s per checkpoint
        real_save(*a, **k)
        time.sleep(1.5)

    monkeypatch.setattr(checkpointer, "save_training_checkpoint", slow_save)
    out = tmp_path / "run"
    args = _args(tiny, tiny_sam_ckpt, out, "--shards", "sa_000000", "--max-steps", "8",
                 "--lr", "2e-4", "--masks-per-image", "8", "--prompt-types", "box",
                 "--teacher-cache", str(tiny / "cache"), "--save-every", "4",
                 "--val-every", "4", "--val-images", "2", "--val-masks", "8")
    summary = train(args)
    assert not summary["teacher_built"]  # the cache covers the training and held-out images
    hist, val = summary["history"], summary["val_history"]
    first, last = hist[0], hist[-1]
    print(f"\nOVERFIT loss {first['loss']:.4f} -> {last['loss']:.4f}, "
          f"cos_sim {first['cos_sim']:.4f} -> {last['cos_sim']:.4f}, "
          f"images/s {sum(h['images_per_s'] for h in hist[1:]) / (len(hist) - 1):.2f}")
    for v in val:
        print("VAL", {k: round(v[k], 4) if isinstance(v[k], float) else v[k]
                      for k in ("step", "cos_sim", "miou_point", "miou_box",
                                "miou_teacher_point", "miou_teacher_box", "images", "masks")})
    assert last["loss"] < 0.9 * first["loss"]  # tiny_bl: 2.89 -> 2.47 in 8 steps
    assert last["cos_sim"] > first["cos_sim"] + 0.05
    # the step after a save: 2 images in well under 1.5 s of training, the save left out
    assert hist[4]["step"] == 5 and hist[4]["images"] == 2 and hist[4]["images_per_s"] > 2 / 1.5
    assert [v["step"] for v in val] == [0, 4, 8] and all(v["images"] == 2 for v in val)
    # held-out images, never trained on: the student's features approach the teacher's. (With
    # random SAM weights the mask mIoUs carry no meaning; they are checked by the oracle test.)
    assert val[-1]["cos_sim"] > val[0]["cos_sim"] + 0.02
    lines = [json.loads(ln) for ln in open(out / "metrics.jsonl")]
    assert [ln["step"] for ln in lines] == list(range(1, 9))
    assert {"loss", "loss_mask", "loss_iou", "loss_fd", "cos_sim", "lr", "images_per_s",
            "skipped_read", "skipped_index", "bad_ann", "large_ann", "epoch"} <= set(lines[0])
    assert [json.loads(ln)["step"] for ln in open(out / "val.jsonl")] == [0, 4, 8]
    assert os.path.isdir(out / "tb")
    sam = blsam_model_registry["tiny_bl"](checkpoint=str(out / "final.pth"), img_size=int(IMG))
    assert state_checksum(sam.state_dict()) == summary["checksums"][0]
    # --val-only evaluates a checkpoint with the same held-out images and prompts
    from blsam.tools.train import cli

    argv = ["--config", os.path.join(ROOT, "configs", "distill_b_t.yaml"), "--model", "tiny_bl",
            "--data", str(tiny / "data"), "--shards", "sa_000000", "--data-fraction", "1",
            "--sam-checkpoint", tiny_sam_ckpt, "--img-size", IMG, "--batch-size", "2",
            "--num-workers", "0", "--teacher-cache", str(tiny / "cache"), "--val-only",
            "--checkpoint", str(out / "final.pth"), "--val-images", "2", "--val-masks", "8"]
    capsys.readouterr()
    assert cli(argv) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["images"] == 2 and got["masks"] == val[-1]["masks"]
    assert got["cos_sim"] == pytest.approx(val[-1]["cos_sim"], abs=1e-4)
    for k in ("miou_box", "miou_teacher_box"):
        assert got[k] == pytest.approx(val[-1][k], abs=2e-3), k
    # a single click takes the argmax of 3 predicted IoUs, which float noise between the two
    # processes' kernels may flip for one near-tied mask (random weights): at most 1 of the 8
    for k in ("miou_point", "miou_teacher_point"):
        assert abs(got[k] - val[-1][k]) <= 1 / got["masks"] + 1e-6, k


def test_val_oracle_student_equal_to_teacher(tiny, tiny_sam_ckpt, tmp_path, capsys):
    """The student at keep ratio 1 with untrained E-blocks is exactly SAM: validation must say
    so."""
    from blsam.tools.train import cli

    init = tmp_path / "init.pth"
    sam = blsam_model_registry["tiny_bl"](sam_checkpoint=tiny_sam_ckpt, img_size=int(IMG),
                                          keep_ratio=1.0)
    torch.save(sam.state_dict(), init)
    argv = ["--data", str(tiny / "data"), "--model", "tiny_bl", "--shards", "sa_000000",
            "--data-fraction", "1",
            "--sam-checkpoint", tiny_sam_ckpt, "--img-size", IMG, "--keep-ratio", "1",
            "--num-workers", "0", "--val-only", "--checkpoint", str(init), "--val-images", "2",
            "--val-masks", "4", "--device", "cpu", "--amp", "none"]  # exact: fp32 (the
    assert cli(argv) == 0  # CPU teacher is fp32; auto is bf16 on an AVX512-BF16/AMX CPU)
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["cos_sim"] > 0.9999 and got["images"] == 2 and got["masks"] > 2
    assert got["miou_teacher_point"] > 0.999 and got["miou_teacher_box"] > 0.999


def test_interactive_prompts_and_padding_mask(tiny, tiny_sam_ckpt, monkeypatch):
    """SAM's interactive iterations: the decoder runs prompt_iters times over every mask, from the
    second on with the previous logits as mask prompt and error-region clicks; deterministic
    per sample seed. The feature loss ignores SAM's padding unless asked to include it."""
    from blsam.train.data import SA1BDataset, collate, select_records
    from blsam.train.distill import click_schedule, error_click

    assert click_schedule(11, 3).count(True) == 8 and click_schedule(11, 3)[-1] is False
    assert click_schedule(1, 0) == [] and click_schedule(3, 0) == [True, False]
    logits = torch.full((2, 1, 4, 4), -5.0)
    logits[0, 0, :2, :2] = 5.0  # predicts the top-left quarter
    logits[1] = 5.0             # predicts everything
    gt = torch.zeros(2, 4, 4)
    gt[0, :2] = 1               # top half: false negatives in the top-right quarter
    gt[1] = 1
    gt[1, 3, 3] = 0             # one false positive pixel
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        xy, lab = error_click(logits, gt, g, 16)
        x, y = xy[0, 0].long().tolist()
        assert lab[0, 0] == 1 and y // 16 < 2 and x // 16 >= 2
        assert lab[1, 0] == 0 and (xy[1, 0].long() // 16).tolist() == [3, 3]
    _, lab = error_click(gt[:, None] * 10 - 5, gt, g, 16)
    assert lab.tolist() == [[-1], [-1]]  # no error: SAM's "not a point"

    sam = blsam_model_registry["tiny_bl"](sam_checkpoint=tiny_sam_ckpt, img_size=int(IMG))
    recs, _ = select_records(str(tiny / "data"))
    ds = SA1BDataset(recs, int(IMG), masks_per_image=3, prompt_types=["point"],
                     teacher_cache=str(tiny / "cache"))
    batch = collate([ds[(0, 0)], ds[(0, 1)]])
    t_emb = torch.stack(batch["teacher"]).float()
    calls = []
    from blsam.train import distill

    real_inputs = distill.prompt_inputs

    def spy(prompt_encoder, points, boxes, masks):
        calls.append((points[0].shape[1], masks is not None, points[0].shape[0]))
        return real_inputs(prompt_encoder, points, boxes, masks)

    monkeypatch.setattr(distill, "prompt_inputs", spy)
    model = DistillModel(sam, 2.5, prompt_iters=4)
    out = model(batch["image"], batch, t_emb)
    # one call per iteration over both images' masks, split when their click counts differ:
    # each image adds its one click after iteration 0 or 1 (4 iterations: 1 + 2 clicks, one
    # dropped at random, + 1 without)
    n = sum(m.shape[0] for m in batch["masks"])
    assert calls[0] == (1, False, n) and calls[-2:] == [(2, True, n)] * 2
    assert len(calls) in (4, 5) and sum(c[2] for c in calls[1:-2]) == n
    assert all(c[1] for c in calls[1:]) and torch.isfinite(out["loss"])
    out["loss"].backward()
    calls.clear()
    again = model(batch["image"], batch, t_emb)
    assert again["loss"].item() == pytest.approx(out["loss"].item(), rel=1e-6)

    # padding: a teacher that differs from the student only in SAM's padding
    hw = batch["hw"]
    assert any(h < int(IMG) or w < int(IMG) for h, w in hw)
    with torch.no_grad():
        emb = sam.image_encoder(batch["image"])
    from blsam.train.losses import real_positions
    valid = real_positions(hw, emb.shape[-1], 16)
    fake = torch.where(valid[:, None], emb, torch.randn_like(emb))
    with torch.no_grad():
        ex = DistillModel(sam, 2.5, fd_padding="exclude")(batch["image"], batch, fake)
        inc = DistillModel(sam, 2.5, fd_padding="include")(batch["image"], batch, fake)
    assert ex["loss_fd"].item() < 1e-5 < 0.05 < inc["loss_fd"].item()


def test_resume_continues_exactly(tiny, tiny_sam_ckpt, tmp_path):
    """3 steps straight == stop after 1 + --resume auto (crosses an epoch boundary: 2 batches
    per epoch), including the optimizer, scheduler and data position."""
    common = ("--max-steps", "3", "--lr", "2e-4", "--warmup-steps", "1", "--shards",
              "sa_000000", "sa_000001", "--masks-per-image", "3",
              "--teacher-cache", str(tiny / "cache"), "--save-every", "2", "--keep-last", "1")
    full = train(_args(tiny, tiny_sam_ckpt, tmp_path / "a", *common))
    part = train(_args(tiny, tiny_sam_ckpt, tmp_path / "b", *common, "--stop-after", "1"))
    assert part["stopped"] and not os.path.exists(tmp_path / "b" / "final.pth")
    # what a kill -9 after step 3's log and during a save leaves behind
    from torch.utils.tensorboard import SummaryWriter

    from blsam.utils.files import wait_for_later_event_file

    wait_for_later_event_file(tmp_path / "b" / "tb")  # TensorBoard orders files by name
    w = SummaryWriter(str(tmp_path / "b" / "tb"))
    for st in (2, 3):
        w.add_scalar("train/loss", 999.0, st)
    w.close()
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])  # temp files of dead processes
    gone.wait()  # (a live pid's temp file is kept: tests/test_train_rundir.py)
    stale = [tmp_path / "b" / f".step_0000002.pth.tmp.{gone.pid}",
             tmp_path / "b" / f".last.pth.link.{gone.pid}"]
    for f in stale:
        f.write_bytes(b"x" * 1000)
    resumed = train(_args(tiny, tiny_sam_ckpt, tmp_path / "b", *common, "--resume", "auto"))
    assert not any(f.exists() for f in stale)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "b" / "tb"))
    acc.Reload()
    events = acc.Scalars("train/loss")
    assert [e.step for e in events] == [1, 2, 3] and all(e.value < 999 for e in events)
    assert_resume_matches_full(tmp_path / "a", tmp_path / "b", full, resumed)
    lines = [json.loads(ln)["step"] for ln in open(tmp_path / "b" / "metrics.jsonl")]
    assert lines == [1, 2, 3]
    assert sorted(f for f in os.listdir(tmp_path / "b") if f.endswith(".pth")) == [
        "final.pth", "last.pth", "step_0000002.pth"]
    ck = torch.load(tmp_path / "b" / "last.pth", weights_only=True)
    assert ck["step"] == 3 and ck["epoch"] == 1 and ck["batch_in_epoch"] == 1
    assert ck["config"]["model"] == "tiny_bl"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # torchrun: several processes
def test_ddp_two_processes_gloo(tiny, tiny_sam_ckpt, tmp_path):
    """torchrun with 2 CPU processes, the real teacher (no cache), gradient accumulation."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), os.path.join(ROOT, "tools", "train.py"),
           "--config", os.path.join(ROOT, "configs", "distill_b_t.yaml"), "--model", "tiny_bl",
           "--data", str(tiny / "data"), "--data-fraction", "1",
           "--sam-checkpoint", tiny_sam_ckpt, "--output-dir", str(out), "--img-size", IMG,
           "--batch-size", "1", "--accum-steps", "2", "--max-steps", "1", "--num-workers", "0",
           "--device", "cpu", "--log-every", "1", "--no-progress", "--masks-per-image", "2",
           "--shards", "sa_000000", "--val-every", "1", "--val-images", "2", "--val-masks", "2"]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.load(open(out / "summary.json"))
    assert summary["world_size"] == 2 and summary["ranks_in_sync"]
    assert len(summary["checksums"]) == 2 and summary["teacher_built"]
    final = read_state_dict(out / "final.pth")
    assert state_checksum(final) == summary["checksums"][0]
    init = blsam_model_registry["tiny_bl"](sam_checkpoint=tiny_sam_ckpt, img_size=int(IMG))
    assert state_checksum(init.state_dict()) != summary["checksums"][0]  # it did train
    rec = [json.loads(ln) for ln in open(out / "metrics.jsonl")]
    assert len(rec) == 1 and rec[0]["step"] == 1
    assert rec[0]["images"] == 4  # global: 2 ranks x 2 micro-steps x batch 1, not rank 0's 2
    val = [json.loads(ln) for ln in open(out / "val.jsonl")]
    assert [v["step"] for v in val] == [0, 1]
    assert all(v["images"] == 2 for v in val)  # held-out sa_3, sa_4 split over the 2 ranks


def test_shipped_config_on_a_partial_download_holds_out_validation_images(tiny, tiny_sam_ckpt,
                                                                          tmp_path, caplog):
    """docs/training.md's advice for a partial download (--data-fraction 1) with a shipped
    config: no image lies outside the selection, so val_images are held out of training
    (announced and recorded) instead of refusing the run."""
    import logging

    out = tmp_path / "run"
    args = _args(tiny, tiny_sam_ckpt, out, "--max-steps", "1", "--val-every", "1",
                 "--val-images", "1", "--val-masks", "2")
    with caplog.at_level(logging.WARNING):
        summary = train(args)
    assert summary["selection"]["val_held_out"] == 1
    assert summary["selection"]["images"] == 4 and summary["val_history"][-1]["images"] == 1
    assert any("held out of training" in r.getMessage() for r in caplog.records)
    # an explicit --val-data without outside images is still refused
    from blsam.train.data import DataError

    with pytest.raises(DataError, match="outside the training subset"):
        train(_args(tiny, tiny_sam_ckpt, tmp_path / "b", "--max-steps", "1", "--val-every", "1",
                    "--val-data", str(tiny / "data")))
