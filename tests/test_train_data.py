"""SA-1B pipeline: tar and folder formats, RLE decoding, subset selection, damaged inputs,
prompt sampling, the per-rank sampler and config errors. No model is built here."""
from __future__ import annotations

import json
import logging
import os
import tarfile

import numpy as np
import pytest
import torch

from blsam.train import data as D
from blsam.train.prompts import mask_box, noisy_box, sample_points
from blsam.train.tiny_sa1b import write_tiny_sa1b

IMG = 64


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("sa1b")
    write_tiny_sa1b(root / "tar", num_shards=2, images_per_shard=3, size=96, fmt="tar")
    write_tiny_sa1b(root / "folder", num_shards=2, images_per_shard=3, size=96, fmt="folder")
    return root


def _ds(records, **kw):
    return D.SA1BDataset(records, img_size=IMG, masks_per_image=4, **kw)


def test_tar_and_folder_give_identical_samples(shards):
    rt, st = D.select_records(str(shards / "tar"))
    rf, sf = D.select_records(str(shards / "folder"))
    assert [r.key for r in rt] == [r.key for r in rf] == [f"sa_{i}" for i in range(1, 7)]
    assert st == sf == []
    single, _ = D.select_records(str(shards / "tar" / "sa_000001.tar"))
    assert [r.key for r in single] == ["sa_4", "sa_5", "sa_6"]
    dt, df = _ds(rt), _ds(rf)
    for i in range(len(rt)):
        a, b = dt[(1, i)], df[(1, i)]
        assert a["key"] == b["key"] and a["kind"] == b["kind"]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["masks"], b["masks"])
        for k in ("boxes", "points"):
            assert (a.get(k) is None) == (b.get(k) is None)
            if a.get(k) is not None:
                assert torch.equal(a[k], b[k])
        assert a["image"].shape == (3, IMG, IMG) and a["masks"].shape[1:] == (IMG // 4, IMG // 4)
        assert 1 <= a["masks"].shape[0] <= 4 and a["skipped"] == []


def test_same_sample_for_same_epoch_and_index_only(shards):
    recs, _ = D.select_records(str(shards / "tar"))
    ds = D.SA1BDataset(recs, img_size=IMG, masks_per_image=2)
    a, b, c = ds[(0, 0)], ds[(0, 0)], ds[(5, 0)]
    assert torch.equal(a["masks"], b["masks"]) and a["kind"] == b["kind"]
    assert torch.equal(a["image"], c["image"])  # no augmentation: teacher cache stays valid


def test_rle_decode_and_resize(shards):
    from pycocotools import mask as mask_utils

    m = np.zeros((40, 60), np.uint8)
    m[10:30, 20:50] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    seg = {"size": [40, 60], "counts": rle["counts"].decode("ascii")}
    assert np.array_equal(D.decode_rle(seg), m)
    r = D.resize_mask(m, (20, 30))  # exactly half: box 5:15 x 10:25
    assert r.shape == (20, 30) and r[5:15, 10:25].all() and r.sum() == 10 * 15
    # a real SA-1B-style record: the sampled low-res targets match the decoded masks
    recs, _ = D.select_records(str(shards / "folder"))
    meta = json.load(open(recs[1].json.path))
    h, w = meta["image"]["height"], meta["image"]["width"]
    ds = D.SA1BDataset(recs, img_size=IMG, masks_per_image=100)
    sample = ds[(0, 1)]
    lows = []
    nh, nw = round(h * IMG / max(h, w)), round(w * IMG / max(h, w))
    for a in meta["annotations"]:
        full = np.zeros((IMG, IMG), bool)
        full[:nh, :nw] = D.resize_mask(D.decode_rle(a["segmentation"]), (nh, nw))
        lows.append(D.downsample_mask(full, 4))
    got = sample["masks"].numpy()
    assert sample["masks"].dtype == torch.uint8  # uint8 until the loss (issue 27.7)
    assert len(got) == len(meta["annotations"])
    for g in got:  # every sampled target is one of the annotation masks
        assert any(np.array_equal(g, low) for low in lows)


def test_preprocess_matches_sam(photo):
    from segment_anything.utils.transforms import ResizeLongestSide

    from blsam import blsam_model_registry

    img = photo[:300, :]  # non-square: exercises the padding
    x, (h, w) = D.preprocess_image(img, IMG)
    sam = blsam_model_registry["tiny_vit"](img_size=IMG)
    ref = ResizeLongestSide(IMG).apply_image(img)
    ref = sam.preprocess(torch.from_numpy(ref).permute(2, 0, 1)[None].float())[0]
    assert (h, w) == (round(IMG * 300 / 512), IMG)
    torch.testing.assert_close(x, ref, atol=1e-5, rtol=1e-5)


def test_data_fraction_deterministic(shards, tmp_path):
    a, _ = D.select_records(str(shards / "tar"), fraction=0.5, seed=1)
    b, _ = D.select_records(str(shards / "tar"), fraction=0.5, seed=1)
    assert [r.key for r in a] == [r.key for r in b] and len(a) == 3  # one of two shards
    one, _ = D.select_records(str(shards / "folder"), fraction=0.02, seed=0)
    assert len(one) == 1  # at least one image
    seeds = {tuple(r.key for r in D.select_records(str(shards / "folder"), fraction=0.5,
                                                    seed=s)[0]) for s in range(6)}
    assert len(seeds) > 1
    sel, _ = D.select_records(str(shards / "tar"), shards=["sa_000001"])
    assert [r.key for r in sel] == ["sa_4", "sa_5", "sa_6"]
    with pytest.raises(D.DataError, match="sa_000009"):
        D.select_records(str(shards / "tar"), shards=["sa_000009.tar"])


def _member_bytes(tar_path):
    with tarfile.open(tar_path) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]


def _write_tar(path, members):
    import io

    with tarfile.open(path, "w") as tf:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))


def test_damaged_members_skipped_and_counted(shards, tmp_path, caplog):
    src = _member_bytes(shards / "tar" / "sa_000000.tar")  # sa_1..sa_3, jpg then json
    damaged = dict(src)
    damaged["sa_1.jpg"] = damaged["sa_1.jpg"][: len(damaged["sa_1.jpg"]) // 3]  # cut jpg
    damaged["sa_2.json"] = b'{"image": {"image_id": 2, '  # corrupt json
    d = tmp_path / "data"
    d.mkdir()
    _write_tar(d / "sa_000000.tar", list(damaged.items()))
    # a shard cut off in the middle of its last member (sa_6.json)
    good = _member_bytes(shards / "tar" / "sa_000001.tar")
    _write_tar(tmp_path / "full.tar", good)
    raw = (tmp_path / "full.tar").read_bytes()
    with tarfile.open(tmp_path / "full.tar") as tf:
        last = tf.getmembers()[-1]
    (d / "sa_000001.tar").write_bytes(raw[: last.offset_data + last.size // 2])
    with caplog.at_level(logging.WARNING):
        recs, skipped = D.select_records(str(d))
    assert skipped == ["sa_000001.tar:sa_6.json", "sa_000001.tar:sa_6"]  # member, then lone jpg
    assert [r.key for r in recs] == ["sa_1", "sa_2", "sa_3", "sa_4", "sa_5"]
    assert "sa_6.json" in caplog.text

    ds = _ds(recs)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        samples = [ds[(0, i)] for i in range(len(recs))]
    assert [s["key"] for s in samples] == ["sa_3", "sa_3", "sa_3", "sa_4", "sa_5"]
    assert samples[0]["skipped"] == ["sa_000000.tar:sa_1", "sa_000000.tar:sa_2"]
    assert samples[1]["skipped"] == ["sa_000000.tar:sa_2"]
    assert "sa_000000.tar:sa_1" in caplog.text and "sa_000000.tar:sa_2" in caplog.text
    batch = D.collate(samples[:2])
    assert len(batch["skipped"]) == 3

    # a garbage jpg in a folder: same treatment
    f = tmp_path / "folder"
    f.mkdir()
    for p in sorted((shards / "folder").iterdir())[:4]:  # sa_1, sa_2 pairs
        (f / p.name).write_bytes(p.read_bytes())
    (f / "sa_1.jpg").write_bytes(b"not a jpeg at all")
    recs, _ = D.select_records(str(f))
    s = _ds(recs)[(0, 0)]
    assert s["key"] == "sa_2" and s["skipped"] == [f"{f}:sa_1"]


def test_missing_or_empty_data_is_a_clear_error(tmp_path, tiny_sam_ckpt, monkeypatch):
    with pytest.raises(D.DataError, match="does not exist"):
        D.select_records(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(D.DataError, match="no sa_"):
        D.select_records(str(tmp_path / "empty"))
    # train() fails on the data before building any model
    import train_checks

    from blsam.tools.train import parse_args
    from blsam.train import run as loop

    def boom(*a, **k):
        raise AssertionError("a model was built before the data was checked")

    monkeypatch.setitem(loop.blsam_model_registry, "tiny_bl", boom)
    monkeypatch.setitem(loop.blsam_model_registry, "tiny_vit", boom)
    args = parse_args(["--data", str(tmp_path / "empty"), "--model", "tiny_bl",
                       "--sam-checkpoint", tiny_sam_ckpt,
                       "--output-dir", str(tmp_path / "out"), "--img-size", "64"])
    with pytest.raises(D.DataError, match="no sa_"):
        train_checks.train(args)


def test_sampler_splits_ranks_and_resumes():
    n, bs = 11, 2
    per = [D.EpochBatchSampler(n, bs, rank=r, world_size=2, seed=3) for r in range(2)]
    for s in per:
        s.set_position(4)
    batches = [list(s) for s in per]
    assert len(batches[0]) == len(batches[1]) == len(per[0]) == 3
    idx = [i for b in batches for batch in b for (e, i) in batch]
    assert set(idx) == set(range(n)) and len(idx) == 12  # padded by one wrap-around
    assert all(e == 4 for b in batches for batch in b for (e, _) in batch)
    per[0].set_position(4, start_batch=1)
    assert list(per[0]) == batches[0][1:]
    other = D.EpochBatchSampler(n, bs, rank=0, world_size=2, seed=3)
    other.set_position(5)
    assert list(other) != batches[0]


def test_prompts_are_inside_the_mask():
    rng = np.random.default_rng(0)
    m = np.zeros((64, 64), bool)
    m[10:20, 30:50] = True
    assert mask_box(m).tolist() == [30, 10, 50, 20]
    for _ in range(20):
        b = noisy_box(m, rng, img_size=64)
        assert b[0] <= b[2] and b[1] <= b[3]
        assert np.all(np.abs(b - mask_box(m)) <= 20 * 64 / 1024 + 1e-6)
    pts = sample_points(m, 5, rng)
    assert pts.shape == (5, 2)
    assert m[pts[:, 1].astype(int), pts[:, 0].astype(int)].all()


def test_bad_config_key_is_an_error(tmp_path):
    from blsam.tools.train import parse_args
    from blsam.utils.config import ConfigError

    cfg = tmp_path / "bad.yaml"
    cfg.write_text("lr: 1.0e-4\nlearning_rate: 3\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        parse_args(["--config", str(cfg)])
    for name in ("distill_b_t.yaml", "distill_h_b.yaml"):
        path = os.path.join(os.path.dirname(__file__), "..", "configs", name)
        args = parse_args(["--config", path, "--lr", "1e-4"])
        assert args.lr == 1e-4 and args.lambda_fd == 2.5 and args.batch_size == 8
        assert args.epochs == 10 and args.data_fraction == 0.02
        assert args.model == name[len("distill_"):-len(".yaml")]


def test_make_tiny_sa1b_cli(tmp_path):
    from blsam.tools.make_tiny_sa1b import main, parse_args

    main(parse_args(["--output", str(tmp_path / "f"), "--format", "folder", "--num-shards", "1",
                     "--images-per-shard", "2", "--size", "48"]))
    assert sorted(os.listdir(tmp_path / "f")) == ["sa_1.jpg", "sa_1.json", "sa_2.jpg",
                                                  "sa_2.json"]
    meta = json.load(open(tmp_path / "f" / "sa_2.json"))
    assert set(meta["image"]) == {"image_id", "width", "height", "file_name"}
    ann = meta["annotations"][0]
    assert {"id", "segmentation", "bbox", "area", "point_coords", "predicted_iou",
            "stability_score", "crop_box"} <= set(ann)
    assert isinstance(ann["segmentation"]["counts"], str)


class _Cv2Threads(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        import cv2

        return cv2.getNumThreads()


def test_data_workers_run_opencv_on_one_thread():
    """Each of N data workers would otherwise start an OpenCV pool as wide as the node. The
    parent has used its pool first (as validation preprocessing does): a worker calling
    cv2.setNumThreads after the fork would deadlock there."""
    import cv2

    from blsam.train.loader import endless_loader

    before = cv2.getNumThreads()
    cv2.setNumThreads(2)  # the parent's pool, in use: what a worker would inherit
    try:
        cv2.resize(np.zeros((512, 512), np.float32), (256, 256), interpolation=cv2.INTER_AREA)
        loader = endless_loader(_Cv2Threads(), _TwoBatches(), list, num_workers=1,
                                epoch=0, start_batch=0, pin=False)
        assert [next(loader)[2] for _ in range(2)] == [[1], [1]]
        assert cv2.getNumThreads() == 2  # the parent's own setting is back
        loader.close()  # the persistent worker goes now, not at a later garbage collection
    finally:
        cv2.setNumThreads(before)


class _TwoBatches:
    def set_position(self, epoch, start):
        pass

    def __iter__(self):
        return iter([[0], [1]])

    def __len__(self):
        return 2
