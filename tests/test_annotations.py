"""The shared annotation-file checks (blsam.annotations): every bad variant of a tiny COCO /
LVIS file that the tests write, refused with one line or skipped and counted by reason."""
from __future__ import annotations

import copy
import json
import time

import numpy as np
import pytest

from blsam.annotations import (
    EMPTY,
    AnnotationFileError,
    decode_object_mask,
    load_annotation_file,
)
from blsam.errors import UserError


def _rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": r["size"], "counts": r["counts"].decode("ascii")}


def tiny(kind: str = "coco") -> dict:
    """Two 40x60 images: a polygon square and an RLE rectangle on each."""
    m = np.zeros((40, 60), bool)
    m[10:20, 5:25] = True
    imgs, anns = [], []
    for i in (1, 2):
        im = {"id": i, "height": 40, "width": 60, "file_name": f"{i}.jpg"}
        if kind == "lvis":
            im.update(neg_category_ids=[2], not_exhaustive_category_ids=[])
        imgs.append(im)
        anns.append({"id": 10 * i, "image_id": i, "category_id": 1, "iscrowd": 0,
                     "segmentation": [[30, 5, 50, 5, 50, 25, 30, 25]], "area": 400.0,
                     "bbox": [30, 5, 20, 20]})
        anns.append({"id": 10 * i + 1, "image_id": i, "category_id": 2, "iscrowd": 0,
                     "segmentation": _rle(m), "area": 200.0, "bbox": [5, 10, 20, 10]})
    cats = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    if kind == "lvis":
        for c, f in zip(cats, "fr"):
            c["frequency"] = f
        for a in anns:
            a.pop("iscrowd")
    return {"images": imgs, "annotations": anns, "categories": cats}


def _load(tmp_path, data, kind=None, name="a.json"):
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return load_annotation_file(str(p), kind)


def test_good_file_loads_and_masks_agree(tmp_path):
    s = _load(tmp_path, tiny())
    assert s.kind == "coco" and s.counts.kept == 4 and s.counts.total_skipped == 0
    assert sorted(s.images) == [1, 2] and s.images[1].file_name == "1.jpg"
    for iid, objs in s.objects_by_image.items():
        for o in objs:
            m = decode_object_mask(o, s.images[iid])
            assert m.shape == (40, 60) and m.dtype == bool and abs(m.sum() - o.area) <= 30
    assert len(s.raw["annotations"]) == 4 and s.raw["images"] == tiny()["images"]
    lv = _load(tmp_path, tiny("lvis"), "lvis", "l.json")
    assert lv.kind == "lvis" and lv.counts.kept == 4
    assert all(a["iscrowd"] == 0 for a in lv.raw["annotations"])  # filled in for LVISEval


def _variant(ann_index: int, **fields):
    d = tiny()
    a = d["annotations"][ann_index]
    for k, v in fields.items():
        if v is KeyError:
            a.pop(k)
        else:
            a[k] = v
    return d


M = np.zeros((40, 60), bool)
M[10:20, 5:25] = True
SHORT = {"size": [40, 60], "counts": [250, 200, 3946 - 2000]}  # sums to less than h*w


@pytest.mark.parametrize("index,fields,reason", [
    (1, {"segmentation": SHORT}, "bad_rle"),
    (1, {"segmentation": dict(_rle(M), size=[40, 61])}, "bad_rle"),
    (1, {"segmentation": {"size": [40, 60], "counts": "zz!"}}, "bad_rle"),
    (0, {"iscrowd": "0"}, "bad_iscrowd"),
    (0, {"iscrowd": 2}, "bad_iscrowd"),
    (0, {"bbox": [1e39, 0, 10, 10]}, "bad_bbox"),
    (0, {"bbox": [0, 0, -5, 10]}, "bad_bbox"),
    (0, {"bbox": [50, 30, 30, 30]}, "bad_bbox"),  # outside the 60x40 image
    (0, {"bbox": ["1", 2, 3, 4]}, "bad_bbox"),
    (0, {"area": float("nan")}, "bad_area"),
    (0, {"area": -3}, "bad_area"),
    (0, {"segmentation": [[1e8, 0, 1e8, 1e8, 0, 1e8]]}, "bad_polygon"),
    (0, {"segmentation": [[1, 2, 3, 4]]}, "bad_polygon"),
    (0, {"segmentation": [[1, 2, 3, "4", 5, 6]]}, "bad_polygon"),
    (0, {"segmentation": "abc"}, "bad_segmentation"),
    (0, {"image_id": "1"}, "bad_image_id"),
    (0, {"image_id": [1]}, "bad_image_id"),
    (0, {"image_id": KeyError}, "missing_image_id"),
    (0, {"image_id": 99}, "unknown_image"),
    (0, {"id": "10"}, "bad_id"),
    (0, {"id": True}, "bad_id"),
    (0, {"id": 11}, "duplicate_id"),
    (0, {"category_id": 7}, "unknown_category"),
    (0, {"category_id": [1]}, "bad_category_id"),
    (0, {"segmentation": [], "bbox": [0, 0, 0, 0], "area": 0}, EMPTY),
])
def test_bad_objects_skipped_and_counted(tmp_path, index, fields, reason):
    s = _load(tmp_path, _variant(index, **fields))
    assert s.counts.kept == 3 and s.counts.skipped == {reason: 1}, s.counts.summary()
    assert s.counts.bad == (0 if reason == EMPTY else 1)
    assert len(s.raw["annotations"]) == 3 and s.counts.objects[0]["reason"] == reason
    if fields.get("iscrowd") == "0":  # "0" is a bad value, not a crowd object
        assert not any(o.iscrowd for objs in s.objects_by_image.values() for o in objs)


def test_huge_polygon_is_refused_before_pycocotools(tmp_path):
    t0 = time.perf_counter()
    _load(tmp_path, _variant(0, segmentation=[[1e8, 0, 1e8, 1e8, 0, 1e8]], bbox=KeyError))
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize("edit,msg", [
    (lambda d: d["images"].append(dict(d["images"][0], file_name="x.jpg")),
     "image id(s) listed more than once"),
    (lambda d: d["images"][1].update(file_name="1.jpg"), "file name(s) used by more than one"),
    (lambda d: d["images"][0].update(id="1"), "image id '1' is not an integer"),
    (lambda d: d["images"][0].update(id=[1]), "is not an integer"),
    (lambda d: d["images"][0].update(id=1.0), "is not an integer"),
    (lambda d: d["images"][0].update(id=False), "is not an integer"),
    (lambda d: d["images"][0].pop("height"), "positive integer height and width"),
    (lambda d: d["images"][0].update(width="60"), "positive integer height and width"),
    (lambda d: d["images"][0].update(width=10 ** 9), "absurd size"),
    (lambda d: d["images"][0].pop("file_name"), "neither a file_name nor a coco_url"),
    (lambda d: d["categories"].append({"id": 1}), "category id 1 listed more than once"),
    (lambda d: d["categories"][0].update(id="1"), "no integer id"),
    (lambda d: d.pop("categories"), "missing key(s) ['categories']"),
    (lambda d: d.update(images={}), "'images' must be a list"),
])
def test_unusable_files_are_refused_in_one_line(tmp_path, edit, msg):
    d = tiny()
    edit(d)
    with pytest.raises(AnnotationFileError, match=msg.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")) as e:
        _load(tmp_path, d)
    assert isinstance(e.value, UserError) and "\n" not in str(e.value)


def test_lvis_fields_checked_at_load_time(tmp_path):
    d = tiny("lvis")
    d["categories"][0]["frequency"] = "x"
    with pytest.raises(AnnotationFileError, match="LVIS frequency 'x'"):
        _load(tmp_path, d, "lvis")
    for key, bad in (("neg_category_ids", [99]), ("not_exhaustive_category_ids", "1"),
                     ("neg_category_ids", ["2"])):
        d = tiny("lvis")
        d["images"][1][key] = bad
        with pytest.raises(AnnotationFileError, match=f"'{key}' must be a list of known"):
            _load(tmp_path, d, "lvis")


def test_not_json_list_top_level_and_size_limit(tmp_path):
    p = tmp_path / "x.json"
    p.write_text("{not json")
    with pytest.raises(AnnotationFileError, match="is not a JSON file"):
        load_annotation_file(str(p))
    p.write_text("[]")
    with pytest.raises(AnnotationFileError, match="detection results file"):
        load_annotation_file(str(p))
    p.write_text(json.dumps(tiny()))
    with pytest.raises(AnnotationFileError, match="more than the"):
        load_annotation_file(str(p), max_bytes=100)
    with pytest.raises(AnnotationFileError, match="not found"):
        load_annotation_file(str(tmp_path / "nope.json"))


def test_missing_optional_fields_and_uncompressed_rle(tmp_path):
    d = tiny()
    a, b = d["annotations"][0], d["annotations"][1]
    for k in ("area", "bbox", "iscrowd"):
        a.pop(k)
    b["segmentation"] = {"size": [40, 60], "counts": _uncompressed(M)}
    b["iscrowd"] = 1
    s = _load(tmp_path, d)
    assert s.counts.kept == 4 and s.counts.total_skipped == 0
    o = s.objects_by_image[1][0]
    assert o.area is None and not o.iscrowd and o.bbox[2] > 0
    raw = {r["id"]: r for r in s.raw["annotations"]}
    assert raw[10]["area"] > 0 and raw[10]["iscrowd"] == 0 and len(raw[10]["bbox"]) == 4
    crowd = s.objects_by_image[1][1]
    assert crowd.iscrowd and decode_object_mask(crowd, s.images[1]).sum() == 200


def _uncompressed(m: np.ndarray) -> list:
    """COCO's uncompressed RLE counts: column-major runs, starting with zeros."""
    out, cur, n = [], 0, 0
    for v in m.T.reshape(-1):
        if v != cur:
            out.append(n)
            cur, n = v, 0
        n += 1
    out.append(n)
    return out


def test_decoded_mask_must_agree_with_area_and_bbox(tmp_path):
    s = _load(tmp_path, _variant(1, area=120.0))
    o = s.objects_by_image[1][1]
    with pytest.raises(ValueError, match="decoded area 200 != file area 120"):
        decode_object_mask(o, s.images[1])
    s = _load(tmp_path, _variant(1, bbox=[30, 20, 20, 10]))
    with pytest.raises(ValueError, match="decoded box"):
        decode_object_mask(s.objects_by_image[1][1], s.images[1])
    d = copy.deepcopy(tiny())
    d["annotations"][0]["segmentation"] = []  # box-only object: kept, no mask
    s = _load(tmp_path, d)
    assert s.objects_by_image[1][0].segmentation is None
    with pytest.raises(ValueError, match="no mask"):
        decode_object_mask(s.objects_by_image[1][0], s.images[1])
