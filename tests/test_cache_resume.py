"""Teacher cache at scale: a part killed mid-way resumes from its last complete chunk without
re-encoding it, stale temporary files of dead writers are removed and counted, and under
torchrun a rank with nothing left never waits in a collective for a rank that re-encodes its
part for longer than the process-group timeout."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from blsam.train import packed_cache as pc
from blsam.train.cache import build_parser, cache_teacher
from blsam.train.teacher import Teacher
from blsam.train.tiny_sa1b import write_tiny_sa1b

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMG = 64


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume_data")
    write_tiny_sa1b(root / "data", num_shards=2, images_per_shard=3, size=80, fmt="tar")
    return root / "data"


def _argv(data, ckpt, out, *extra):
    return ["--data", str(data), "--data-fraction", "1", "--sam-checkpoint", ckpt, "--model",
            "tiny_bl", "--img-size", str(IMG), "--output", str(out), "--num-workers", "0",
            "--batch-size", "2", "--chunk-images", "2", "--poll-seconds", "0.2", *extra]


def _run(argv):
    from blsam.train.cache import CacheConfig

    return cache_teacher(CacheConfig.from_options(vars(build_parser().parse_args(argv))))


def _rows(out):
    pc.forget()
    r = pc.PackedCache(str(out))
    return {k: r.get(k) for k in r.where}


def test_killed_part_resumes_from_its_last_chunk(data, tiny_sam_ckpt, tmp_path, monkeypatch):
    full = _run(_argv(data, tiny_sam_ckpt, tmp_path / "full"))
    assert full["cached"] == 6 and full["written"] == 6
    ref = _rows(tmp_path / "full")

    out = tmp_path / "cache"
    real, calls = Teacher.encode, []

    def dies_on_third_batch(self, images):
        calls.append(images.shape[0])
        if len(calls) == 3:
            raise KeyboardInterrupt  # a kill: the writer's chunks so far must survive
        return real(self, images)

    monkeypatch.setattr(Teacher, "encode", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        _run(_argv(data, tiny_sam_ckpt, out))
    names = sorted(os.listdir(out))
    assert "part_00000-of-00001.bin.partial" in names and "index.json" not in names
    assert [n for n in names if ".chunk_" in n] == ["part_00000-of-00001.chunk_00000.json",
                                                     "part_00000-of-00001.chunk_00001.json"]
    # a dead writer of the old format left its temp file; a torn row follows the last chunk
    (out / "part_00000-of-00001.bin.tmp.4242").write_bytes(b"x" * 100)
    with open(out / "part_00000-of-00001.bin.partial", "ab") as f:
        f.write(b"\0" * 1000)

    calls.clear()
    monkeypatch.setattr(Teacher, "encode", lambda self, im: (calls.append(im.shape[0]),
                                                             real(self, im))[1])
    res = _run(_argv(data, tiny_sam_ckpt, out))
    assert calls == [2]  # only the last 2 of 6 images are encoded again
    assert res["resumed"] == 4 and res["written"] == 2 and res["cached"] == 6
    assert res["stale_temps_removed"] == 1
    assert sorted(os.listdir(out)) == ["index.json", "part_00000-of-00001.bin",
                                       "part_00000-of-00001.json"]
    got = _rows(out)
    assert sorted(got) == sorted(ref)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=0, rtol=0)


WRAPPER = '''
import os, sys, time
from blsam.train.teacher import Teacher
from blsam.tools.cache_teacher import main, parse_args
if os.environ.get("RANK") == "1":
    real = Teacher.encode
    def slow(self, images):
        time.sleep(float(os.environ["BLSAM_TEST_SLEEP"]))
        return real(self, images)
    Teacher.encode = slow
main(parse_args(sys.argv[1:]))
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(tmp_path, argv, pause):
    script = tmp_path / "wrapper.py"
    script.write_text(WRAPPER)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", BLSAM_TEST_SLEEP=str(pause))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), str(script), *argv, "--device", "cpu"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)


@pytest.mark.slow
def test_rank_with_part_done_does_not_time_out_waiting(data, tiny_sam_ckpt, tmp_path):
    """Rank 0's part is complete, rank 1 re-encodes its 3 images in 2 batches of 3 s each,
    with a 2 s process-group timeout: the run completes and equals a one-process cache."""
    single = tmp_path / "one"
    _run(_argv(data, tiny_sam_ckpt, single))
    out = tmp_path / "two"
    proc = _torchrun(tmp_path, _argv(data, tiny_sam_ckpt, out), 0)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for suffix in (".bin", ".json"):  # rank 1's part is lost: only rank 1 has work left
        os.remove(out / f"part_00001-of-00002{suffix}")
    os.remove(out / "index.json")
    proc = _torchrun(tmp_path, _argv(data, tiny_sam_ckpt, out, "--dist-timeout", "0.03"), 3)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    index = json.load(open(out / "index.json"))
    assert [p["count"] for p in index["parts"]] == [3, 3]
    assert sum(len(k) for k in index["keys"]) == 6
    a, b = _rows(single), _rows(out)
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-3, rtol=1e-3)
    shutil.rmtree(out)
