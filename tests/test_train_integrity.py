"""Issue 11, no model built: damaged SA-1B annotations are skipped and counted (never decoded
into uninitialised memory), SAM's >90% mask filter, the data-selection report and warning,
one definition of the data flags, and training clicks in evaluation's pixel convention."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from blsam.train import data as D
from blsam.train.tiny_sa1b import write_tiny_sa1b

IMG = 64


@pytest.fixture()
def folder(tmp_path):
    write_tiny_sa1b(tmp_path / "f", num_shards=1, images_per_shard=2, size=96, fmt="folder")
    return tmp_path / "f"


def _edit(path, fn):
    meta = json.loads(path.read_text())
    fn(meta)
    path.write_text(json.dumps(meta))
    return meta


def test_rle_run_lengths_match_pycocotools():
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(0)
    for t in range(30):
        h, w = (int(v) for v in rng.integers(1, 60, 2))
        m = (rng.random((h, w)) > rng.random()).astype(np.uint8)
        if t % 2:  # long runs: multi-chunk numbers and negative deltas
            m = np.zeros((h, w), np.uint8)
            m[int(rng.integers(0, h)):, int(rng.integers(0, w)):] = 1
        rle = mask_utils.encode(np.asfortranarray(m))
        runs = D.rle_run_lengths(rle["counts"].decode("ascii"))
        assert runs.sum() == m.size and runs[1::2].sum() == int(m.sum())
        flat = np.concatenate([np.full(r, i % 2, np.uint8) for i, r in enumerate(runs)])
        assert np.array_equal(flat.reshape(w, h).T, m)  # column-major, like COCO
    for bad in ("\x7f", "0" * 3 + "o", "P" * 13 + "0"):
        with pytest.raises(D.AnnotationError):
            D.rle_run_lengths(bad)


def test_bad_annotations_are_skipped_and_counted(folder):
    """Empty counts, a short RLE, a wrong area and a wrong box: 4 bad annotations, skipped and
    counted; the sample is the same on every load (no uninitialised memory)."""
    def damage(meta):
        a = meta["annotations"]
        a[0]["segmentation"]["counts"] = ""  # decodes to garbage in pycocotools
        a[1]["segmentation"]["counts"] = a[1]["segmentation"]["counts"][:3]  # runs < h*w
        a[2]["area"] = a[2]["area"] * 3 + 50
        a[3]["bbox"] = [0.0, 0.0, 1.0, 1.0]
    meta = _edit(folder / "sa_1.json", damage)
    recs, _ = D.select_records(str(folder))
    ds = D.SA1BDataset(recs, img_size=IMG, masks_per_image=100, max_mask_fraction=1.0)
    a, b = ds[(0, 0)], ds[(0, 0)]
    n = len(meta["annotations"])
    assert a["key"] == "sa_1" and a["bad_ann"] == 4 and a["large_ann"] == 0
    assert a["masks"].shape[0] <= n - 4 and torch.equal(a["masks"], b["masks"])
    h, w = meta["image"]["height"], meta["image"]["width"]
    nh, nw = round(h * IMG / max(h, w)), round(w * IMG / max(h, w))
    good = []
    for ann in meta["annotations"][4:]:
        full = np.zeros((IMG, IMG), bool)
        full[:nh, :nw] = D.resize_mask(D.decode_rle(ann["segmentation"]), (nh, nw))
        good.append(D.downsample_mask(full, 4))
    for g in a["masks"].numpy():
        assert any(np.array_equal(g, x) for x in good)
    batch = D.collate([a, b])
    assert batch["bad_ann"] == 8


def test_image_without_usable_annotation_is_replaced(folder):
    def kill(meta):
        for ann in meta["annotations"]:
            ann["segmentation"]["counts"] = ""
    _edit(folder / "sa_1.json", kill)
    recs, _ = D.select_records(str(folder))
    s = D.SA1BDataset(recs, img_size=IMG)[(0, 0)]
    assert s["key"] == "sa_2" and s["skipped"] == [f"{folder}:sa_1"]


def test_masks_over_90_percent_are_dropped(folder):
    from pycocotools import mask as mask_utils

    def add_full(meta):
        h, w = meta["image"]["height"], meta["image"]["width"]
        m = np.ones((h, w), np.uint8)
        m[0, 0] = 0
        rle = mask_utils.encode(np.asfortranarray(m))
        meta["annotations"] = [{
            "id": 99, "segmentation": {"size": [h, w], "counts": rle["counts"].decode()},
            "area": int(m.sum()), "bbox": [0.0, 0.0, float(w), float(h)]}] + meta["annotations"]
    meta = _edit(folder / "sa_1.json", add_full)
    recs, _ = D.select_records(str(folder))
    n = len(meta["annotations"])
    on = D.SA1BDataset(recs, img_size=IMG, masks_per_image=100)[(0, 0)]
    off = D.SA1BDataset(recs, img_size=IMG, masks_per_image=100, max_mask_fraction=1.0)[(0, 0)]
    assert on["large_ann"] == 1 and off["large_ann"] == 0
    assert on["masks"].shape[0] == off["masks"].shape[0] - 1 <= n - 1
    assert (off["masks"].flatten(1).float().mean(1) > 0.9).any()
    assert not (on["masks"].flatten(1).float().mean(1) > 0.9).any()


def test_data_fraction_reports_and_warns_on_per_image_fallback(tmp_path, caplog):
    write_tiny_sa1b(tmp_path / "t", num_shards=2, images_per_shard=3, size=48, fmt="tar")
    info = {}
    with caplog.at_level(logging.INFO, logger="blsam.train.data"):
        recs, _ = D.select_records(str(tmp_path / "t"), fraction=0.4, seed=0, info=info)
    # 0.4 of 2 shards is less than one shard: single images, and a warning that says so
    assert info == {"shards_total": 2, "shards_selected": 2, "images_indexed": 6,
                    "images": 2, "mode": "images"} and len(recs) == 2
    warn = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warn) == 1 and "less than one whole shard" in warn[0].getMessage()
    assert "2 images selected" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="blsam.train.data"):
        D.select_records(str(tmp_path / "t"), fraction=0.5, seed=0, info=info)
    assert info["mode"] == "shards" and info["shards_selected"] == 1 and info["images"] == 3
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_val_records_are_disjoint_from_training(tmp_path):
    write_tiny_sa1b(tmp_path / "t", num_shards=3, images_per_shard=2, size=48, fmt="tar")
    train, _ = D.select_records(str(tmp_path / "t"), shards=["sa_000001"])
    val = D.select_val_records(str(tmp_path / "t"), train, 3, seed=0)
    assert len(val) == 3 and not {r.key for r in val} & {r.key for r in train}
    everything, _ = D.select_records(str(tmp_path / "t"), fraction=1.0)
    with pytest.raises(D.DataError, match="outside the training subset"):
        D.select_val_records(str(tmp_path / "t"), everything, 3)


def test_train_and_cache_share_one_data_flag_definition():
    from blsam.train.cache import build_parser as cache_parser
    from blsam.train.options import build_parser as train_parser

    def flags(p):
        return {a.dest: (a.option_strings, a.default, a.type, a.nargs, a.help)
                for a in p._actions if a.dest in ("data", "shards", "data_fraction", "seed",
                                                  "num_workers")}
    t, c = flags(train_parser()), flags(cache_parser())
    assert len(t) == 5 and t == c


def test_training_clicks_use_evaluation_pixel_convention():
    """Training and evaluation click with one sampler (blsam.prompts): integer pixel indices
    inside the mask (SAM's prompt encoder adds the half pixel; the training sampler used to
    add it a second time)."""
    from blsam.evaluation import prompts as ev
    from blsam.prompts import sample_points
    from blsam.train import prompts as tr

    assert tr.sample_points is sample_points and ev.sample_points is sample_points
    m = np.zeros((40, 40), bool)
    m[5:17, 20:33] = True
    for seed in range(5):
        a = sample_points(m, 3, np.random.default_rng(seed))
        assert np.array_equal(a, np.round(a)) and m[a[:, 1].astype(int), a[:, 0].astype(int)].all()


def test_training_loop_is_split_into_parts_that_read_alone():
    """options.train was 215 lines of setup, resume, loop, logging and checkpoints."""
    import inspect

    from blsam.train import checkpointer, loop, metrics_log, run, trainer

    assert len(inspect.getsource(trainer.Trainer.fit).splitlines()) <= 20
    for fn in (run.setup, checkpointer.resume, loop.train_step, metrics_log.log_window,
               checkpointer.save, loop.validate, loop.run_loop, loop.finish):
        assert len(inspect.getsource(fn).splitlines()) <= 80, fn.__name__
