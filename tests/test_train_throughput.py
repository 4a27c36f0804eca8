"""Loop-level throughput pieces (issue 12): phase timers and profiler, async checkpoints with
mmap loading, one persistent loader whose resumed stream equals the uninterrupted one (packed
cache, workers), one-buffer batch transfer, uint8 normalisation, and a two-"node" torchrun
rendezvous (c10d) training run whose ranks end with identical weights."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from blsam.train import async_ckpt, loader, timing
from blsam.train import packed_cache as pc
from blsam.train.resume import load_training_checkpoint
from blsam.utils.images import resize_and_pad_uint8

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_phase_timer_laps_and_window_record(monkeypatch):
    clock = iter([0.0, 1.0, 1.5, 3.5, 6.5, 7.0, 8.0, 10.0, 10.25]).__next__
    monkeypatch.setattr(timing.time, "perf_counter", clock)
    t = timing.PhaseTimer(torch.device("cpu"))  # t = 0
    for name in ("data", "teacher", "forward", "backward", "optimizer", "validation",
                 "checkpoint", "data"):
        t.lap(name)
    times = t.collect()
    assert times == {"data": 1.0 + 0.25, "teacher": 0.5, "forward": 2.0, "backward": 3.0,
                     "optimizer": 0.5, "validation": 1.0, "checkpoint": 2.0, "steps": 1.0}
    rec = timing.window_record(times, images_global=8)
    assert rec["time_step"] == pytest.approx(7.25)  # checkpoint and validation time left out
    assert rec["global_images_per_s"] == pytest.approx(8 / 7.25)
    assert rec["data_wait_share"] == pytest.approx(1.25 / 7.25)
    assert t.collect()["data"] == 0.0  # collect resets the window
    with pytest.raises(ValueError, match="unknown phase"):
        t.lap("bogus")


def test_profiler_writes_a_trace_of_n_steps(tmp_path):
    prof = timing.StepProfiler(2, str(tmp_path), 0, torch.device("cpu"))
    x = torch.randn(32, 32)
    for _ in range(5):
        with torch.profiler.record_function("train_step"):
            x = torch.tanh(x @ x)
        prof.step()
    prof.stop()
    trace = json.load(open(tmp_path / "profile_rank0.json"))
    steps = [e for e in trace["traceEvents"] if e.get("name") == "train_step"]
    assert len(steps) == 2
    assert timing.StepProfiler(0, str(tmp_path), 0, torch.device("cpu")).prof is None
    with pytest.raises(ValueError):
        timing.StepProfiler(-1, str(tmp_path), 0, torch.device("cpu"))


def test_async_checkpoint_snapshot_atomic_and_mmap_load(tmp_path):
    from blsam.checkpoint import save_atomic

    w = torch.nn.Linear(4, 4)
    state = {"model": w.state_dict(), "step": 3, "rng": [torch.arange(3)]}
    before = {k: v.clone() for k, v in w.state_dict().items()}
    writer = async_ckpt.AsyncCheckpointWriter()
    writer.save(save_atomic, state, str(tmp_path / "last.pth"))
    with torch.no_grad():
        w.weight.add_(1.0)  # training goes on while the file is written
    writer.wait()
    ck = torch.load(tmp_path / "last.pth", map_location="cpu", weights_only=True, mmap=True)
    torch.testing.assert_close(ck["model"]["weight"], before["weight"], atol=0, rtol=0)
    assert ck["step"] == 3 and ck["rng"][0].tolist() == [0, 1, 2]
    good = open(tmp_path / "last.pth", "rb").read()

    def failing(snap, path):
        save_atomic({"x": torch.zeros(1)}, path + "/no/such/dir/../x")  # not a folder
    writer.save(failing, state, str(tmp_path / "last.pth"))
    with pytest.raises(RuntimeError, match="background checkpoint write failed"):
        writer.wait()
    assert open(tmp_path / "last.pth", "rb").read() == good  # the last good file is kept
    writer.wait()  # the error is reported once


def test_pack_unpack_one_buffer_roundtrip():
    batch = {"image": torch.randn(2, 3, 8, 8), "key": ["a", "b"], "kind": ["box", "point"],
             "masks": [torch.rand(3, 2, 2), torch.zeros(0, 2, 2)],
             "boxes": [torch.rand(3, 4), None], "labels": [None, torch.ones(1, 3).long()],
             "teacher": [torch.randn(4, 1, 1).half(), None], "skipped": []}
    ref = {k: (list(v) if isinstance(v, list) else v) for k, v in batch.items()}
    packed = loader.PackingCollate(lambda s: s)(dict(batch))
    assert packed["image"] is None and packed["masks"] == [None, None]
    assert isinstance(packed[loader.PACKED]["flat"], torch.Tensor)
    out = loader.unpack_batch(packed, torch.device("cpu"))
    assert loader.PACKED not in out
    flat = out["image"].untyped_storage().data_ptr()
    for k in ("image",):
        torch.testing.assert_close(out[k], ref[k], atol=0, rtol=0)
    for k in ("masks", "boxes", "labels", "teacher"):
        for a, b in zip(out[k], ref[k]):
            assert (a is None) == (b is None)
            if a is not None:
                assert a.dtype == b.dtype and a.shape == b.shape
                torch.testing.assert_close(a, b, atol=0, rtol=0)
                assert a.untyped_storage().data_ptr() == flat  # all views of one buffer
    assert out["key"] == ["a", "b"] and out["kind"] == ["box", "point"]
    assert loader.unpack_batch({"x": 1}, torch.device("cpu")) == {"x": 1}


def test_uint8_normalised_on_device_equals_host_preprocessing():
    from blsam.testing import real_photo
    from blsam.train.data import preprocess_image

    img = real_photo()[:300, :200]  # portrait: padding on the right
    ref, hw = preprocess_image(img, 128)
    u8, hw8 = resize_and_pad_uint8(img, 128)
    assert hw8 == hw and u8.dtype == torch.uint8 and u8[:, :, hw[1]:].eq(0).all()
    got = loader.normalize_images(u8[None], [hw])
    assert torch.equal(got[0], ref)  # bitwise: caches made either way agree
    assert loader.normalize_images(ref[None], [hw]) is not None
    assert torch.equal(loader.normalize_images(ref[None], [hw]), ref[None])  # float: as is


def _write_fake_cache(path, keys, shape):
    meta = {"format": pc.FORMAT, "teacher": "vit_b", "teacher_sha256": "x" * 64,
            "img_size": shape[-1] * 16, "shape": list(shape), "dtype": "float16"}
    w = pc.PartWriter(str(path), 0, 1, meta)
    g = torch.Generator().manual_seed(0)
    for k in keys:
        w.append(k, torch.randn(*shape, generator=g))
    w.close()
    pc.write_index(str(path), 1, meta)


def test_endless_loader_resumed_stream_equals_uninterrupted(tmp_path):
    """Persistent workers (2) + packed cache: the stream resumed mid-epoch at (1, 1) gives
    bitwise the batches the stream from (0, 0) gives there, across epoch boundaries."""
    from blsam.train.data import EpochBatchSampler, SA1BDataset, collate, select_records
    from blsam.train.tiny_sa1b import write_tiny_sa1b

    write_tiny_sa1b(tmp_path / "data", num_shards=1, images_per_shard=5, size=64,
                    masks_per_image=3)
    recs, _ = select_records(str(tmp_path / "data"))
    _write_fake_cache(tmp_path / "cache", [r.key for r in recs], (256, 4, 4))
    ds = SA1BDataset(recs, 64, masks_per_image=2, teacher_cache=str(tmp_path / "cache"))

    def take(epoch, start, n, workers):
        sampler = EpochBatchSampler(len(ds), 2, seed=3)  # 3 batches per epoch (last short)
        stream = loader.endless_loader(ds, sampler, collate, workers, epoch, start,
                                         pin=False)
        return [next(stream) for _ in range(n)]

    full = take(0, 0, 7, workers=2)
    assert [(e, b) for e, b, _ in full] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2),
                                            (2, 0)]
    resumed = take(1, 1, 3, workers=2)
    assert len({tuple(x["key"]) for _, _, x in full[:3]}) > 1  # epochs differ
    for (e1, b1, x), (e2, b2, y) in zip(full[4:], resumed):
        assert (e1, b1) == (e2, b2) and x["key"] == y["key"] and x["kind"] == y["kind"]
        assert torch.equal(x["image"], y["image"])
        for k in ("masks", "teacher"):
            for a, b in zip(x[k], y[k]):
                assert torch.equal(a, b)
        assert all(t is not None and t.dtype == torch.float16 for t in x["teacher"])
    no_workers = take(1, 1, 3, workers=0)
    assert [x["key"] for _, _, x in no_workers] == [x["key"] for _, _, x in resumed]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # torchrun: several processes
def test_two_nodes_through_c10d_rendezvous(tmp_path, tiny_sam_ckpt):
    """Two torchrun agents (stand-ins for two nodes, one process each) meet through the c10d
    rendezvous, train 3 steps from a packed cache with a persistent worker, async
    checkpoints and --profile; both ranks end with identical weights, and only global rank 0
    writes files."""
    from blsam.tools.cache_teacher import main as cache_main
    from blsam.tools.cache_teacher import parse_args as cache_args
    from blsam.train.tiny_sa1b import write_tiny_sa1b

    write_tiny_sa1b(tmp_path / "data", num_shards=2, images_per_shard=2, size=80,
                    fmt="tar")
    cache_main(cache_args(["--data", str(tmp_path / "data"), "--data-fraction", "1",
                           "--model", "tiny_bl",
                           "--sam-checkpoint", tiny_sam_ckpt, "--img-size", "64",
                           "--output", str(tmp_path / "cache"), "--num-workers", "0"]))
    out = tmp_path / "run"
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    procs = []
    for _ in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
               "--nproc-per-node", "1", "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "blsam-test",
               os.path.join(ROOT, "tools", "train.py"),
               "--config", os.path.join(ROOT, "configs", "distill_b_t.yaml"), "--model", "tiny_bl",
               "--data", str(tmp_path / "data"), "--data-fraction", "1",
               "--sam-checkpoint", tiny_sam_ckpt, "--teacher-cache", str(tmp_path / "cache"),
               "--output-dir", str(out), "--img-size", "64", "--batch-size", "1",
               "--max-steps", "3", "--num-workers", "1", "--device", "cpu", "--log-every", "1",
               "--save-every", "1", "--keep-last", "1", "--profile", "1", "--no-progress",
               "--masks-per-image", "2", "--warmup-steps", "1", "--async-checkpoint", "on",
               "--val-every", "0"]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(x[-3000:] for x in logs)
    summary = json.load(open(out / "summary.json"))
    assert summary["world_size"] == 2 and summary["ranks_in_sync"]
    assert len(set(summary["checksums"])) == 1 and not summary["teacher_built"]
    assert sorted(os.listdir(out)) == [".blsam-steps.json", "ckpt_timing.json", "final.pth",
                                       "last.pth",
                                       "metrics.jsonl", "profile_rank0.json", "step_0000003.pth",
                                       "summary.json", "tb", "val.jsonl"]
    recs = [json.loads(ln) for ln in open(out / "metrics.jsonl")]
    assert [r["step"] for r in recs] == [1, 2, 3]
    for key in ("time_data", "time_teacher", "time_forward", "time_backward",
                "time_optimizer", "time_checkpoint", "time_step", "global_images_per_s",
                "data_wait_share"):
        assert all(np.isfinite(r[key]) and r[key] >= 0 for r in recs), key
    ck = load_training_checkpoint(str(out / "last.pth"))
    assert ck["step"] == 3


def test_benchmark_train_runs_on_the_device_it_is_given(tmp_path, capsys):
    """``blsam-benchmark-train`` end to end on the tiny pair (teacher, cache, step parts), with
    the device and precision recorded; ``--device cuda`` without CUDA is one line, exit 2."""
    from blsam.tools.benchmark_train import cli

    out = tmp_path / "bench"
    argv = ["--model", "tiny_bl", "--img-size", "64", "--batch-size", "1", "--steps", "3",
            "--repeats", "1", "--num-workers", "0", "--photo-size", "96",
            "--masks-per-image", "2", "--cache-rows", "4", "--cache-img-size", "64",
            "--work-dir", str(tmp_path / "work"), "--output", str(out)]
    assert cli([*argv, "--device", "cpu"]) == 0, capsys.readouterr().err[-2000:]
    res = json.loads((tmp_path / "bench.json").read_text())
    assert res["config"]["device"] == "cpu" and res["config"]["amp"] == "none"
    assert 0 <= res["step"]["data_wait_share"] <= 1 and res["teacher"]["min_cos_sim"] > 0.999
    assert "# Training throughput on CPU (tiny_bl, 64², batch 1, fp32)" in (
        tmp_path / "bench.md").read_text()
    capsys.readouterr()
    if not torch.cuda.is_available():
        assert cli([*argv, "--device", "cuda"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == ["error: --device cuda: CUDA is not available on this machine"], err


class _Driver:
    """Records the page-locking calls (the driver's part; the pool's logic is under test)."""

    def __init__(self):
        self.registered, self.unregistered = [], []

    def pool(self):
        from blsam.train.pinned import PinnedPool

        return PinnedPool(lambda ptr, n: self.registered.append(n), self.unregistered.append)


def test_pinned_buffers_are_exact_size_reused_and_released():
    """Issue 27.5: torch's pinned allocator rounds to powers of two and keeps the blocks (a
    72 MB batch pinned 128 MB, an 8.6 GiB snapshot 12 GiB); the pool registers the size
    rounded to 2 MiB and reuses it once the copy out of it is done."""
    from blsam.train.pinned import GRANULE

    drv = _Driver()
    pool = drv.pool()
    a = pool.take(72_000_000)
    assert drv.registered == [-(-72_000_000 // GRANULE) * GRANULE] == [a.numel()]
    assert a.numel() < 72_000_000 + GRANULE < 128 * 2**20
    busy = [True]
    pool.give(a, lambda: not busy[0])  # its copy to the GPU still in flight
    b = pool.take(72_000_000)
    assert b.data_ptr() != a.data_ptr() and len(drv.registered) == 2
    busy[0] = False
    pool.give(b)
    c, d = pool.take(72_000_000), pool.take(72_000_000)
    assert {c.data_ptr(), d.data_ptr()} == {a.data_ptr(), b.data_ptr()}
    assert len(drv.registered) == 2 and pool.pinned_bytes == 2 * a.numel()
    pool.release()
    assert sorted(drv.unregistered) == sorted([a.data_ptr(), b.data_ptr()])


def test_snapshot_and_batches_stage_through_the_pool():
    """The snapshot's tensors go into ONE buffer of their total size, reused by the next
    snapshot; packed batches staged through the pool arrive intact, batch after batch."""
    from blsam.train.pinned import rounded

    drv = _Driver()
    pool = drv.pool()
    state = [torch.randn(1000, 300), torch.arange(7), torch.randn(3, 3).half()]
    buf, copies = async_ckpt.pinned_copies(state, pool)
    assert len(drv.registered) == 1 and buf.numel() == rounded(
        sum(-(-t.numel() * t.element_size() // 64) * 64 for t in state))
    for src, dst in zip(state, copies):
        assert torch.equal(src, dst) and dst.dtype == src.dtype
    pool.give(buf)
    buf2, _ = async_ckpt.pinned_copies(state, pool)
    assert buf2.data_ptr() == buf.data_ptr() and len(drv.registered) == 1
    pool.give(buf2)
    got = []
    for i in range(3):
        batch = {"image": torch.full((1, 3, 8, 8), i, dtype=torch.uint8),
                 "masks": [torch.ones(2, 2, 2, dtype=torch.uint8) * i], "kind": ["box"]}
        got.append(loader.unpack_batch(loader.pack_batch(batch), torch.device("cpu"), pool))
    for i, b in enumerate(got):  # no batch aliases the reused staging buffer
        assert int(b["image"].unique()) == i and int(b["masks"][0].unique()) == i
