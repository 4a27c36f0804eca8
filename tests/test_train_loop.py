"""Training loop on a tiny configuration (b_t, 64 px, batch 2, CPU, no workers): the loss goes
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

from blsam import blsam_model_registry
from blsam.checkpoint import read_state_dict
from blsam.train.engine import DistillModel, enable_grad_checkpointing, state_checksum, train
from blsam.train.tiny_sa1b import write_tiny_sa1b

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMG = "64"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, sam_vit_b_ckpt):
    """Two shards of 2 images, and a teacher cache for them made by tools/cache_teacher.py."""
    from tools.cache_teacher import main as cache_main, parse_args as cache_args

    root = tmp_path_factory.mktemp("tiny")
    write_tiny_sa1b(root / "data", num_shards=2, images_per_shard=2, size=96, fmt="tar")
    cache_main(cache_args(["--data", str(root / "data"), "--data-fraction", "1",
                           "--sam-checkpoint", sam_vit_b_ckpt, "--img-size", IMG,
                           "--output", str(root / "cache"), "--num-workers", "0"]))
    return root


def _args(tiny, ckpt, out, *extra):
    from tools.train import parse_args

    return parse_args([
        "--config", os.path.join(ROOT, "configs", "distill_b_t.yaml"),
        "--data", str(tiny / "data"), "--data-fraction", "1", "--sam-checkpoint", ckpt,
        "--output-dir", str(out), "--img-size", IMG, "--batch-size", "2", "--num-workers", "0",
        "--log-every", "1", "--warmup-steps", "0", "--no-progress", "--val-every", "0", *extra])


def test_cache_matches_teacher(tiny, sam_vit_b_ckpt):
    from blsam.train.data import SA1BDataset, select_records

    recs, _ = select_records(str(tiny / "data"))
    ds = SA1BDataset(recs, int(IMG), with_targets=False, teacher_cache=str(tiny / "cache"))
    s = ds[(0, 0)]
    teacher = blsam_model_registry["vit_b"](checkpoint=sam_vit_b_ckpt, img_size=int(IMG))
    with torch.no_grad():
        ref = teacher.image_encoder(s["image"][None])[0]
    assert s["teacher"].dtype == torch.float16 and s["teacher"].shape == ref.shape
    torch.testing.assert_close(s["teacher"].float(), ref, atol=2e-2, rtol=1e-2)


def test_every_b_t_parameter_gets_a_gradient(tiny, sam_vit_b_ckpt):
    """So DDP can run with find_unused_parameters=False (image_encoder and 'all' minus the
    prompt encoder's unused embeddings)."""
    from blsam.train.data import SA1BDataset, collate, select_records

    sam = blsam_model_registry["b_t"](sam_checkpoint=sam_vit_b_ckpt, img_size=int(IMG))
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


def test_overfit_loss_down_cos_up_and_final_model_loads(tiny, sam_vit_b_ckpt, tmp_path):
    out = tmp_path / "run"
    args = _args(tiny, sam_vit_b_ckpt, out, "--shards", "sa_000000", "--max-steps", "8",
                 "--lr", "2e-4", "--masks-per-image", "8", "--prompt-types", "box",
                 "--teacher-cache", str(tiny / "cache"), "--save-every", "100")
    summary = train(args)
    assert not summary["teacher_built"]  # the cache covers both images
    hist = summary["history"]
    first, last = hist[0], hist[-1]
    print(f"\nOVERFIT loss {first['loss']:.4f} -> {last['loss']:.4f}, "
          f"cos_sim {first['cos_sim']:.4f} -> {last['cos_sim']:.4f}, "
          f"images/s {sum(h['images_per_s'] for h in hist[1:]) / (len(hist) - 1):.2f}")
    assert last["loss"] < 0.85 * first["loss"]
    assert last["cos_sim"] > first["cos_sim"] + 0.05
    lines = [json.loads(ln) for ln in open(out / "metrics.jsonl")]
    assert [ln["step"] for ln in lines] == list(range(1, 9))
    assert {"loss", "loss_mask", "loss_iou", "loss_fd", "cos_sim", "lr", "images_per_s",
            "skipped_read", "skipped_index", "epoch"} <= set(lines[0])
    assert os.path.isdir(out / "tb")
    sam = blsam_model_registry["b_t"](checkpoint=str(out / "final.pth"), img_size=int(IMG))
    assert state_checksum(sam.state_dict()) == summary["checksums"][0]


def test_resume_continues_exactly(tiny, sam_vit_b_ckpt, tmp_path):
    """3 steps straight == stop after 1 + --resume auto (crosses an epoch boundary: 2 batches
    per epoch), including the optimizer, scheduler and data position."""
    common = ("--max-steps", "3", "--lr", "2e-4", "--warmup-steps", "1", "--shards",
              "sa_000000", "sa_000001", "--masks-per-image", "3",
              "--teacher-cache", str(tiny / "cache"), "--save-every", "2", "--keep-last", "1")
    full = train(_args(tiny, sam_vit_b_ckpt, tmp_path / "a", *common))
    part = train(_args(tiny, sam_vit_b_ckpt, tmp_path / "b", *common, "--stop-after", "1"))
    assert part["stopped"] and not os.path.exists(tmp_path / "b" / "final.pth")
    resumed = train(_args(tiny, sam_vit_b_ckpt, tmp_path / "b", *common, "--resume", "auto"))
    a = read_state_dict(tmp_path / "a" / "final.pth")
    b = read_state_dict(tmp_path / "b" / "final.pth")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)
    assert [h["loss"] for h in full["history"][1:]] == pytest.approx(
        [h["loss"] for h in resumed["history"]], abs=1e-5)
    lines = [json.loads(ln)["step"] for ln in open(tmp_path / "b" / "metrics.jsonl")]
    assert lines == [1, 2, 3]
    assert sorted(f for f in os.listdir(tmp_path / "b") if f.endswith(".pth")) == [
        "final.pth", "last.pth", "step_0000002.pth"]
    ck = torch.load(tmp_path / "b" / "last.pth", weights_only=True)
    assert ck["step"] == 3 and ck["epoch"] == 1 and ck["batch_in_epoch"] == 1
    assert ck["config"]["model"] == "b_t"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_gloo(tiny, sam_vit_b_ckpt, tmp_path):
    """torchrun with 2 CPU processes, the real teacher (no cache), gradient accumulation."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), os.path.join(ROOT, "tools", "train.py"),
           "--config", os.path.join(ROOT, "configs", "distill_b_t.yaml"),
           "--data", str(tiny / "data"), "--data-fraction", "1",
           "--sam-checkpoint", sam_vit_b_ckpt, "--output-dir", str(out), "--img-size", IMG,
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
    init = blsam_model_registry["b_t"](sam_checkpoint=sam_vit_b_ckpt, img_size=int(IMG))
    assert state_checksum(init.state_dict()) != summary["checksums"][0]  # it did train
    rec = [json.loads(ln) for ln in open(out / "metrics.jsonl")]
    assert len(rec) == 1 and rec[0]["step"] == 1
    assert rec[0]["images"] == 4  # global: 2 ranks x 2 micro-steps x batch 1, not rank 0's 2
    val = [json.loads(ln) for ln in open(out / "val.jsonl")]
    assert [v["step"] for v in val] == [0, 1]
    assert all(v["images"] == 2 for v in val)  # held-out sa_3, sa_4 split over the 2 ranks
