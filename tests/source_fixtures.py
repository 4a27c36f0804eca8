"""Tiny training sets in the formats users bring (test fixtures only): a COCO instances json
written in each variant real files use, and a folder of plain images, from scikit-image photos
with masks from a SLIC segmentation of them (``blsam.train.tiny_sa1b``)."""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from blsam.train.tiny_sa1b import _jpeg, _photo, _segments


def _polygon(m: np.ndarray) -> list[list[float]]:
    """The outer contour of a mask, as a COCO polygon (x, y pairs at pixel centres)."""
    import cv2

    contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_SIMPLE)
    c = max(contours, key=cv2.contourArea).reshape(-1, 2).astype(float)
    return [[round(float(v), 2) for v in (c + 0.5).reshape(-1)]] if len(c) >= 3 else []


def _shoelace(poly: list[float]) -> float:
    p = np.asarray(poly, float).reshape(-1, 2)
    x, y = p[:, 0], p[:, 1]
    return float(0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def _object(m: np.ndarray, variant: str, oid: int, iid: int) -> dict[str, Any]:
    """One object of ``m`` written the way ``variant`` writes it."""
    h, w = m.shape
    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    box = [float(v) for v in mask_utils.toBbox(rle)]
    ann: dict[str, Any] = {"id": oid, "image_id": iid, "category_id": 1, "iscrowd": 0}
    if variant in ("polygon", "tool"):
        poly = _polygon(m)
        ann["segmentation"] = poly
        prle = mask_utils.merge(mask_utils.frPyObjects(poly, h, w))
        ann["bbox"] = [round(v, 3) + 0.0 for v in mask_utils.toBbox(prle).tolist()]
        ann["area"] = (_shoelace(poly[0]) if variant == "tool"
                       else float(mask_utils.area(prle)))
        if variant == "tool":  # CVAT / Label Studio: attributes, float everything
            ann["attributes"] = {"occluded": False}
    elif variant == "rle":
        ann.update(segmentation={"size": [h, w], "counts": rle["counts"].decode("ascii")},
                   bbox=box, area=float(m.sum()) + 0.0)
    elif variant == "rle_list":  # uncompressed RLE (counts a list of run lengths)
        ann.update(segmentation={"size": [h, w], "counts": _runs(
            m.astype(np.uint8).flatten(order="F"))}, bbox=box, area=int(m.sum()))
    elif variant == "crowd":
        ann.update(segmentation={"size": [h, w], "counts": _runs(
            m.astype(np.uint8).flatten(order="F"))}, bbox=box, area=int(m.sum()), iscrowd=1)
    elif variant == "minimal":  # only what a mask needs: no bbox, area, iscrowd, category
        ann = {"id": oid, "image_id": iid,
               "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")}}
    return ann


def _runs(flat: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE counts of a column-major 0/1 vector (first run counts zeros)."""
    out, cur, n = [], 0, 0
    for v in flat.tolist():
        if v == cur:
            n += 1
        else:
            out.append(n)
            cur, n = v, 1
    out.append(n)
    return out


VARIANTS = ("polygon", "rle", "rle_list", "tool", "minimal", "crowd")


def write_tiny_coco(out_dir: str, num_images: int = 3, size: int = 96, bad: int = 0,
                    first_id: int = 1) -> dict[str, str]:
    """``out_dir/images/*.jpg`` (png for every third) and ``out_dir/train.json``: each image
    has one object per ``VARIANTS`` entry (a different SLIC region each), image ids from
    ``first_id``; ``bad`` extra objects on the first image are wrong (short RLE, box far from
    the mask, area 10x the mask, a 2-point polygon, a bbox of 1e39, a string image_id).
    Returns ann_file, img_dir."""
    from PIL import Image

    img_dir = os.path.join(out_dir, "images")
    os.makedirs(img_dir, exist_ok=True)
    images, anns = [], []
    oid = 1
    for i in range(num_images):
        iid = first_id + i
        img = _photo(i, size)
        name = f"img_{iid:04d}.{'png' if i % 3 == 2 else 'jpg'}"
        if name.endswith(".png"):
            Image.fromarray(img).save(os.path.join(img_dir, name))
        else:
            with open(os.path.join(img_dir, name), "wb") as f:
                f.write(_jpeg(img))
        h, w = img.shape[:2]
        images.append({"id": iid, "file_name": name, "height": h, "width": w, "license": 0,
                       "flickr_url": "", "coco_url": "", "date_captured": 0})
        masks = _segments(img, len(VARIANTS), seed=iid)
        for variant, m in zip(VARIANTS, masks):
            anns.append(_object(m, variant, oid, iid))
            oid += 1
        if i == 0:
            anns += _bad_objects(masks[0], iid, oid, bad)
            oid += bad
    data = {"info": {"description": "tiny", "version": "1.0"}, "licenses": [],
            "images": images, "annotations": anns,
            "categories": [{"id": 1, "name": "region", "supercategory": ""}]}
    ann_file = os.path.join(out_dir, "train.json")
    with open(ann_file, "w", encoding="utf-8") as f:
        json.dump(data, f)
    return {"ann_file": ann_file, "img_dir": img_dir}


def _bad_objects(m: np.ndarray, iid: int, oid: int, n: int) -> list[dict[str, Any]]:
    h, w = m.shape
    good = _object(m, "rle", 0, iid)
    counts = good["segmentation"]["counts"]
    variants = [
        dict(good, segmentation={"size": [h, w], "counts": counts[: len(counts) // 2]}),
        dict(good, bbox=[0.0, 0.0, 3.0, 3.0] if good["bbox"][0] > 20 else [60.0, 60.0, 3.0, 3.0]),
        dict(good, area=good["area"] * 10),
        dict(good, segmentation=[[1.0, 1.0, 5.0, 5.0]]),
        dict(good, bbox=[1e39, 0.0, 5.0, 5.0]),
        dict(good, image_id=str(iid)),
    ]
    return [dict(v, id=oid + k) for k, v in enumerate((variants * n)[:n])]


def write_image_folder(root: str, num_images: int = 3, size: int = 96) -> list[str]:
    """Plain images in nested folders and mixed extensions (.jpg, .PNG, .webp) plus files a
    folder also holds (a .txt, a hidden file); returns the image paths."""
    from PIL import Image

    paths = []
    exts = (".jpg", ".PNG", ".webp")
    for i in range(num_images):
        sub = os.path.join(root, f"part{i % 2}")
        os.makedirs(sub, exist_ok=True)
        p = os.path.join(sub, f"photo_{i}{exts[i % 3]}")
        Image.fromarray(_photo(i + 3, size)).save(p, format=None if i % 3 != 1 else "PNG")
        paths.append(p)
    with open(os.path.join(root, "notes.txt"), "w") as f:
        f.write("not an image")
    with open(os.path.join(root, ".hidden.jpg"), "wb") as f:
        f.write(b"")
    return paths
