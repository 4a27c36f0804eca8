"""Packed teacher cache: written by tools/cache_teacher.py (also sharded across 2 processes),
rows equal the teacher's output, reads are memory-mapped, a cache from another teacher
checkpoint or image size is refused, a damaged part is refused."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from blsam.testing import save_random_sam_checkpoint
from blsam.train import packed_cache as pc
from blsam.train.data import SA1BDataset, select_records
from blsam.train.teacher import Teacher, cache_covers, check_cache
from blsam.train.tiny_sa1b import write_tiny_sa1b

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMG = 64


def _cache(data, ckpt, out, *extra):
    from blsam.tools.cache_teacher import main, parse_args

    main(parse_args(["--data", str(data), "--data-fraction", "1", "--model", "tiny_bl",
                     "--sam-checkpoint", ckpt,
                     "--img-size", str(IMG), "--output", str(out), "--num-workers", "0",
                     "--batch-size", "2", *extra]))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache_data")
    write_tiny_sa1b(root / "data", num_shards=2, images_per_shard=3, size=80, fmt="tar")
    return root / "data"


def test_packed_cache_rows_equal_teacher_and_refuse_others(data, tiny_sam_ckpt, tmp_path):
    out = tmp_path / "cache"
    _cache(data, tiny_sam_ckpt, out)
    files = sorted(os.listdir(out))
    assert files == ["index.json", "part_00000-of-00001.bin", "part_00000-of-00001.json"]
    index = json.load(open(out / "index.json"))
    assert index["teacher"] == "tiny_vit" and index["img_size"] == IMG
    assert index["teacher_sha256"] == pc.file_sha256(tiny_sam_ckpt)
    assert os.path.getsize(out / "part_00000-of-00001.bin") == 6 * 256 * 4 * 4 * 2

    recs, _ = select_records(str(data))
    assert cache_covers(str(out), [r.key for r in recs])
    assert not cache_covers(str(out), [r.key for r in recs] + ["sa_999"])
    ds = SA1BDataset(recs, IMG, with_targets=False, teacher_cache=str(out))
    teacher = Teacher("tiny_vit", tiny_sam_ckpt, IMG, torch.device("cpu"))
    samples = [ds[(0, i)] for i in range(len(ds))]
    ref = teacher.encode(torch.stack([s["image"] for s in samples]))
    for s, r in zip(samples, ref):
        assert s["teacher"].dtype == torch.float16
        torch.testing.assert_close(s["teacher"], r.half(), atol=0, rtol=0)  # exact fp16 rows
    reader = pc.PackedCache(str(out))
    assert isinstance(reader._map(0), np.memmap) and reader.get("sa_999") is None

    check_cache(str(out), "tiny_vit", IMG, tiny_sam_ckpt)
    other = save_random_sam_checkpoint("tiny_vit", tmp_path / "other.pth", seed=1, img_size=IMG)
    with pytest.raises(pc.CacheError, match="teacher_sha256"):
        check_cache(str(out), "tiny_vit", IMG, other)
    with pytest.raises(pc.CacheError, match="img_size"):
        check_cache(str(out), "tiny_vit", 128, tiny_sam_ckpt)
    # the writer refuses to mix teachers in one folder
    with pytest.raises(pc.CacheError, match="choose another folder"):
        _cache(data, other, out)

    # rerun with everything done: nothing is recomputed, the index is rewritten the same
    before = open(out / "part_00000-of-00001.bin", "rb").read()
    _cache(data, tiny_sam_ckpt, out)
    assert open(out / "part_00000-of-00001.bin", "rb").read() == before

    # a truncated part is refused with the sizes it claims
    with open(out / "part_00000-of-00001.bin", "r+b") as f:
        f.truncate(len(before) - 2)
    pc.forget()
    with pytest.raises(pc.CacheError, match="index claims"):
        pc.PackedCache(str(out)).get(recs[0].key)

    # an old one-file-per-image cache is refused with a clear message
    old = tmp_path / "old"
    old.mkdir()
    (old / "meta.json").write_text('{"teacher": "tiny_vit", "img_size": 64}')
    with pytest.raises(pc.CacheError, match="rebuild"):
        check_cache(str(old), "tiny_vit", IMG, tiny_sam_ckpt)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # torchrun: several processes
def test_torchrun_writes_one_part_per_rank(data, tiny_sam_ckpt, tmp_path):
    single, multi = tmp_path / "one", tmp_path / "two"
    _cache(data, tiny_sam_ckpt, single)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), os.path.join(ROOT, "tools", "cache_teacher.py"),
           "--data", str(data), "--data-fraction", "1", "--model", "tiny_bl",
           "--sam-checkpoint", tiny_sam_ckpt,
           "--img-size", str(IMG), "--output", str(multi), "--num-workers", "0",
           "--device", "cpu"]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    index = json.load(open(multi / "index.json"))
    assert [p["file"] for p in index["parts"]] == ["part_00000-of-00002.bin",
                                                   "part_00001-of-00002.bin"]
    assert [p["count"] for p in index["parts"]] == [3, 3]
    a, b = pc.PackedCache(str(single)), pc.PackedCache(str(multi))
    assert sorted(a.where) == sorted(b.where) and len(a) == 6
    for k in a.where:
        torch.testing.assert_close(a.get(k), b.get(k), atol=1e-3, rtol=1e-3)
    shutil.rmtree(multi)
