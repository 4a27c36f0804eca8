"""Training trusts neither --data nor the teacher cache's index: the same image name twice is
refused (never one silently dropped), a row of damaged images is one clear line (also through
a DataLoader worker), a cache part outside its folder or copied from another cache is refused."""
from __future__ import annotations

import io
import json
import shutil
import tarfile

import pytest
import torch

from blsam.errors import UserError
from blsam.train import data as D
from blsam.train import packed_cache as pc
from blsam.train.tiny_sa1b import write_tiny_sa1b
from blsam.utils.cli import one_line


def _add(tf, name, payload):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tf.addfile(info, io.BytesIO(payload))


def test_same_stem_in_two_folders_of_a_tar_is_refused(tmp_path):
    src = tmp_path / "src"
    write_tiny_sa1b(src, num_shards=1, images_per_shard=2, size=64, masks_per_image=2)
    with tarfile.open(src / "sa_000000.tar") as tf:
        members = {m.name: tf.extractfile(m).read() for m in tf}
    data = tmp_path / "data"
    data.mkdir()
    with tarfile.open(data / "sa_000000.tar", "w") as tf:
        for folder in ("a", "b"):  # sa_1 twice: before, one of them was silently dropped
            for name, payload in members.items():
                _add(tf, f"{folder}/{name}", payload)
    with pytest.raises(D.DataError, match=r"2 image name\(s\) appear more than once in --data, "
                                          r"e.g. sa_000000.tar:a/sa_1 and sa_000000.tar:b/sa_1"):
        D.select_records(str(data))
    two = tmp_path / "two"  # the same shard under two names
    two.mkdir()
    shutil.copy(src / "sa_000000.tar", two / "sa_000000.tar")
    shutil.copy(src / "sa_000000.tar", two / "sa_000001.tar")
    with pytest.raises(D.DataError, match="sa_000000.tar:sa_1 and sa_000001.tar:sa_1"):
        D.select_records(str(two))
    recs, _ = D.select_records(str(src))  # one folder level inside a tar is still read
    assert [r.key for r in recs] == ["sa_1", "sa_2"]


def _damage_all(folder):
    for p in folder.glob("*.jpg"):
        p.write_bytes(b"not a jpeg")


def test_a_row_of_damaged_images_is_one_clear_error(tmp_path):
    write_tiny_sa1b(tmp_path / "f", num_shards=1, images_per_shard=3, size=64,
                    masks_per_image=2, fmt="folder")
    _damage_all(tmp_path / "f")
    recs, _ = D.select_records(str(tmp_path / "f"))
    ds = D.SA1BDataset(recs, img_size=64)
    with pytest.raises(D.DamagedDataError, match=r"3 images in a row could not be used \(from "
                                                 r"image 0 of 3\), e.g. .*sa_1.*UnidentifiedI"):
        ds[(0, 0)]
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=1, collate_fn=D.collate)
    with pytest.raises(D.DamagedDataError) as e:  # re-raised from the worker: one line still
        next(iter(loader))
    assert isinstance(e.value, UserError)
    text = one_line(e.value)
    assert text.startswith("3 images in a row") and "Traceback" not in text


def _cache(path, keys, seed=0, shape=(4, 2, 2)):
    meta = {"format": pc.FORMAT, "teacher": "vit_b", "teacher_sha256": "x" * 64,
            "img_size": 32, "shape": list(shape), "dtype": "float16"}
    w = pc.PartWriter(str(path), 0, 1, meta)
    g = torch.Generator().manual_seed(seed)
    for k in keys:
        w.append(k, torch.randn(*shape, generator=g))
    w.close()
    return pc.write_index(str(path), 1, meta)


def test_cache_part_paths_stay_inside_the_folder(tmp_path):
    _cache(tmp_path / "other", ["a", "b"])
    index = _cache(tmp_path / "mine", ["a", "b"], seed=1)
    assert set(index["parts"][0]) == {"file", "count", "bytes", "sha256"}
    for bad in ("../other/part_00000-of-00001.bin", "/etc/passwd", ".verified.json", ""):
        index["parts"][0]["file"] = bad
        (tmp_path / "mine" / "index.json").write_text(json.dumps(index))
        with pytest.raises(pc.CacheError, match="that is not a file of this folder"):
            pc.PackedCache(str(tmp_path / "mine"))
    # a link out of the folder is refused too
    (tmp_path / "mine" / "part_link.bin").symlink_to(tmp_path / "other" /
                                                     "part_00000-of-00001.bin")
    index["parts"][0]["file"] = "part_link.bin"
    (tmp_path / "mine" / "index.json").write_text(json.dumps(index))
    with pytest.raises(pc.CacheError, match="not a file of this folder"):
        pc.read_index(str(tmp_path / "mine"))


def test_cache_part_copied_from_another_cache_is_refused(tmp_path):
    _cache(tmp_path / "other", ["a", "b"])
    _cache(tmp_path / "mine", ["a", "b"], seed=1)
    mine = str(tmp_path / "mine")
    assert pc.verify_parts(mine) > 0 and pc.verify_parts(mine) == 0  # checked once per copy
    part = "part_00000-of-00001.bin"
    shutil.copy2(tmp_path / "other" / part, tmp_path / "mine" / part)  # same size and mtime
    with pytest.raises(pc.CacheError, match="a part of another cache"):
        pc.verify_parts(mine)
    from blsam.train.teacher import check_cache

    with pytest.raises(pc.CacheError, match="a part of another cache"):
        check_cache(mine, "vit_b", 32)
    index = json.loads((tmp_path / "mine" / "index.json").read_text())
    for p in index["parts"]:
        del p["sha256"]
    (tmp_path / "mine" / "index.json").write_text(json.dumps(index))
    with pytest.raises(pc.CacheError, match="made before parts carried checksums"):
        pc.verify_parts(mine)
