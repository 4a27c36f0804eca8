"""COCO / LVIS annotation files: loading, validation, image lookup, masks and detections.

Why validation here: a wrong ``--ann-file`` (a results file, a SA-1B json, a typo'd path) would
otherwise surface as a ``KeyError`` deep in the loop or, worse, as an mIoU over nothing.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
from pycocotools import mask as mask_utils

REQUIRED_KEYS = ("images", "annotations", "categories")
COCO_SPLIT_DIRS = ("val2017", "train2017")


class DatasetError(ValueError):
    """An annotation, image or detection file that cannot be evaluated."""


@dataclass
class EvalDataset:
    """An annotation file as loaded, plus the indexes the evaluation loop needs."""

    path: str
    kind: str  # "coco" or "lvis"
    raw: Dict[str, Any]
    images: List[Dict[str, Any]]  # sorted by id: the order every rank and every model uses
    anns_by_image: Dict[int, List[Dict[str, Any]]] = field(default_factory=dict)
    categories: Dict[int, Dict[str, Any]] = field(default_factory=dict)

    @property
    def image_ids(self) -> List[int]:
        return [img["id"] for img in self.images]


def _read_json(path: str) -> Any:
    if not os.path.isfile(path):
        raise DatasetError(f"annotation file not found: {path}")
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path!r} is not a JSON file: {e}") from e


def detect_kind(data: Dict[str, Any]) -> str:
    """"lvis" when categories carry LVIS' ``frequency`` or images only have ``coco_url``."""
    cats = data.get("categories") or []
    imgs = data.get("images") or []
    if any("frequency" in c for c in cats[:50]):
        return "lvis"
    if imgs and all("file_name" not in im and "coco_url" in im for im in imgs[:50]):
        return "lvis"
    return "coco"


def validate_dataset(data: Any, path: str, kind: Optional[str] = None) -> str:
    """Raise ``DatasetError`` unless ``data`` is a COCO/LVIS instances file; return its kind."""
    if not isinstance(data, dict):
        raise DatasetError(
            f"{path!r} is not a COCO/LVIS annotation file: top level is a "
            f"{type(data).__name__}, expected an object with keys {list(REQUIRED_KEYS)}"
            + (" (a list looks like a detection results file)" if isinstance(data, list) else "")
        )
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise DatasetError(
            f"{path!r} is not a COCO/LVIS annotation file: missing key(s) {missing} "
            f"(found {sorted(data)[:10]})"
        )
    for k in REQUIRED_KEYS:
        if not isinstance(data[k], list):
            raise DatasetError(f"{path!r}: '{k}' must be a list, got {type(data[k]).__name__}")
    for im in data["images"][:100]:
        if "id" not in im or "height" not in im or "width" not in im:
            raise DatasetError(f"{path!r}: image entries need id, height and width: {im}")
        if "file_name" not in im and "coco_url" not in im:
            raise DatasetError(f"{path!r}: image {im['id']} has neither file_name nor coco_url")
    for ann in data["annotations"][:100]:
        for key in ("id", "image_id", "category_id", "segmentation"):
            if key not in ann:
                raise DatasetError(f"{path!r}: annotation without '{key}': {str(ann)[:200]}")
    found = detect_kind(data)
    if kind is not None and kind != found:
        if kind == "lvis":
            raise DatasetError(
                f"--dataset lvis, but {path!r} looks like COCO (categories have no 'frequency'); "
                f"use --dataset coco"
            )
        # COCO protocol on an LVIS file works (mIoU, COCOeval ignores LVIS extras)
    return kind or found


def load_dataset(path: str, kind: Optional[str] = None) -> EvalDataset:
    """Load and validate a COCO or LVIS instances file (``kind`` None: detect it)."""
    path = os.fspath(path)
    data = _read_json(path)
    kind = validate_dataset(data, path, kind)
    images = sorted(data["images"], key=lambda im: im["id"])
    ids = {im["id"] for im in images}
    by_image: Dict[int, List[Dict[str, Any]]] = defaultdict(list)
    for ann in data["annotations"]:
        if ann["image_id"] not in ids:
            raise DatasetError(f"{path!r}: annotation {ann['id']} refers to unknown image "
                               f"{ann['image_id']}")
        by_image[ann["image_id"]].append(ann)
    for anns in by_image.values():
        anns.sort(key=lambda a: a["id"])
    cats = {c["id"]: c for c in data["categories"]}
    return EvalDataset(path, kind, data, images, dict(by_image), cats)


def check_lvis_eval_fields(data: Dict[str, Any], path: str = "annotation file") -> None:
    """LVISEval needs LVIS' federated fields; fail before evaluating instead of after."""
    no_freq = [c["id"] for c in data["categories"] if "frequency" not in c]
    if no_freq:
        raise DatasetError(f"{path!r}: LVIS AP needs a 'frequency' (r/c/f) for every category; "
                           f"missing for category ids {no_freq[:5]} (a COCO file? use "
                           f"--dataset coco)")
    for im in data["images"]:
        for key in ("neg_category_ids", "not_exhaustive_category_ids"):
            if key not in im:
                raise DatasetError(f"{path!r}: LVIS AP needs '{key}' on every image; image "
                                   f"{im['id']} has none")


def image_file_name(img: Dict[str, Any]) -> str:
    """COCO: ``file_name``; LVIS: the last part of ``coco_url``."""
    if img.get("file_name"):
        return os.path.basename(img["file_name"]) if "coco_url" in img else img["file_name"]
    return img["coco_url"].rstrip("/").split("/")[-1]


def resolve_image_path(img_dir: str, img: Dict[str, Any]) -> Optional[str]:
    """The image's file under ``img_dir``, directly or in a ``train2017``/``val2017`` subfolder
    (LVIS v1 val mixes COCO train and val images); None if it is nowhere."""
    name = image_file_name(img)
    candidates = [os.path.join(img_dir, name)]
    if img.get("file_name") and img["file_name"] != name:
        candidates.append(os.path.join(img_dir, img["file_name"]))
    url = img.get("coco_url", "")
    split = url.rstrip("/").split("/")[-2] if url.count("/") >= 1 else ""
    subdirs = ([split] if split in COCO_SPLIT_DIRS else []) + [
        d for d in COCO_SPLIT_DIRS if d != split
    ]
    candidates += [os.path.join(img_dir, d, name) for d in subdirs]
    for c in candidates:
        if os.path.isfile(c):
            return c
    return None


def read_image(path: str) -> np.ndarray:
    """RGB uint8 HxWx3 (``blsam.utils.images.load_rgb_image``, errors as ``DatasetError``)."""
    from blsam.utils.images import load_rgb_image

    try:
        return load_rgb_image(path)
    except (FileNotFoundError, ValueError) as e:
        raise DatasetError(str(e)) from e


def ann_to_rle(segmentation: Any, height: int, width: int) -> Dict[str, Any]:
    """Polygons, uncompressed RLE or compressed RLE -> compressed RLE (pycocotools)."""
    if isinstance(segmentation, list):
        polys = [p for p in segmentation if len(p) >= 6]
        if not polys:
            return mask_utils.encode(np.zeros((height, width), dtype=np.uint8, order="F"))
        return mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
    if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        return mask_utils.frPyObjects(segmentation, height, width)
    if isinstance(segmentation, dict) and "counts" in segmentation:
        rle = dict(segmentation)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
        return rle
    raise DatasetError(f"unsupported segmentation format: {str(segmentation)[:100]}")


def ann_to_mask(ann: Dict[str, Any], height: int, width: int) -> np.ndarray:
    """Boolean HxW mask of an annotation."""
    return mask_utils.decode(ann_to_rle(ann["segmentation"], height, width)).astype(bool)


def mask_to_rle(mask: np.ndarray) -> Dict[str, Any]:
    """JSON-ready compressed RLE (``counts`` as str), the COCO results format."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def load_detections(path: str, dataset: EvalDataset) -> Dict[int, List[Dict[str, Any]]]:
    """COCO-format detection results grouped by image, sorted by descending score.

    Detections for images the annotation file does not have are an error: they mean the wrong
    detection file (e.g. test-dev boxes against val annotations).
    """
    if not os.path.isfile(path):
        raise DatasetError(f"detection file not found: {path}")
    try:
        with open(path, "r", encoding="utf-8") as f:
            dets = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"detection file {path!r} is not JSON: {e}") from e
    if isinstance(dets, dict) and "annotations" in dets:
        dets = dets["annotations"]
    if not isinstance(dets, list):
        raise DatasetError(f"detection file {path!r} must be a list of COCO results")
    ids = set(dataset.image_ids)
    unknown = set()
    by_image: Dict[int, List[Dict[str, Any]]] = defaultdict(list)
    for i, d in enumerate(dets):
        for key in ("image_id", "category_id", "bbox", "score"):
            if key not in d:
                raise DatasetError(f"detection {i} in {path!r} has no '{key}': {str(d)[:200]}")
        if d["image_id"] not in ids:
            unknown.add(d["image_id"])
            continue
        if d["category_id"] not in dataset.categories:
            raise DatasetError(f"detection {i} in {path!r}: unknown category {d['category_id']}")
        by_image[d["image_id"]].append(d)
    if unknown:
        raise DatasetError(
            f"detection file {path!r} has detections for {len(unknown)} image id(s) not in "
            f"{dataset.path!r}, e.g. {sorted(unknown)[:5]}: wrong detection or annotation file?"
        )
    for v in by_image.values():
        v.sort(key=lambda d: -float(d["score"]))  # stable: ties keep file order
    return dict(by_image)


# --------------------------------------------------------------------------- tiny test sets
def _photos(size: int) -> List[np.ndarray]:
    import cv2
    from skimage import data

    out = []
    for fn in (data.astronaut, data.coffee, data.chelsea):
        img = fn()
        out.append(np.ascontiguousarray(cv2.resize(img, (size, size),
                                                   interpolation=cv2.INTER_AREA)))
    return out


def _ellipse_poly(cx: float, cy: float, ax: float, ay: float, n: int = 24) -> List[float]:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    pts = np.stack([cx + ax * np.cos(t), cy + ay * np.sin(t)], 1)
    return [round(float(v), 2) for v in pts.reshape(-1)]


def make_tiny_dataset(
    out_dir: str, kind: str = "coco", size: int = 128, num_images: int = 3,
    with_detections: bool = True,
) -> Dict[str, str]:
    """Write a tiny COCO- or LVIS-format set made of real photos (scikit-image data).

    Per image: a large polygon object (> 96² px at size 128), a medium and a small ellipse
    polygon, an RLE object; image 1 also holds a crowd RLE and an empty annotation (both must be
    skipped). LVIS: images only have ``coco_url`` (files in ``val2017/``/``train2017/``),
    categories have ``frequency``. Returns paths: ann_file, img_dir, det_file.
    """
    import cv2

    os.makedirs(out_dir, exist_ok=True)
    img_dir = os.path.join(out_dir, "images")
    s = size / 128.0
    cats = [{"id": 1, "name": "thing", "frequency": "f"},
            {"id": 2, "name": "blob", "frequency": "c"},
            {"id": 3, "name": "dot", "frequency": "r"}]
    if kind == "coco":
        cats = [{k: v for k, v in c.items() if k != "frequency"} | {"supercategory": "x"}
                for c in cats]
    images, anns, dets = [], [], []
    aid = 100
    for i, photo in enumerate(_photos(size)[:num_images]):
        img_id = 10 + i
        name = f"{img_id:012d}.jpg"
        split = "train2017" if (kind == "lvis" and i % 2) else ("val2017" if kind == "lvis" else "")
        folder = os.path.join(img_dir, split)
        os.makedirs(folder, exist_ok=True)
        cv2.imwrite(os.path.join(folder, name), cv2.cvtColor(photo, cv2.COLOR_RGB2BGR))
        im: Dict[str, Any] = {"id": img_id, "height": size, "width": size}
        if kind == "coco":
            im["file_name"] = name
        else:
            im.update(coco_url=f"http://images.cocodataset.org/{split}/{name}",
                      neg_category_ids=[3] if i == 0 else [], not_exhaustive_category_ids=[])
        images.append(im)
        x0, y0 = 8 * s + 3 * i, 6 * s + 2 * i
        large = [x0, y0, x0 + 110 * s, y0 + 4 * s, x0 + 104 * s, y0 + 108 * s, x0 + 6 * s,
                 y0 + 100 * s]
        objs = [
            (1, [[round(v, 2) for v in large]]),
            (2, [_ellipse_poly(40 * s + 4 * i, 44 * s, 24 * s, 18 * s)]),
            (3, [_ellipse_poly(92 * s, 90 * s - 3 * i, 5 * s, 4 * s, 12)]),
        ]
        rect = np.zeros((size, size), np.uint8)
        rect[int(70 * s):int(110 * s), int(20 * s) + 2 * i:int(56 * s)] = 1
        rle = mask_to_rle(rect.astype(bool))
        objs.append((2, rle))
        for cat, seg in objs:
            r = ann_to_rle(seg, size, size)
            area = float(mask_utils.area(r))
            bbox = [float(v) for v in mask_utils.toBbox(r)]
            anns.append({"id": aid, "image_id": img_id, "category_id": cat, "segmentation": seg,
                         "area": area, "bbox": bbox, "iscrowd": 0})
            if with_detections:
                jit = [bbox[0] + 1, bbox[1] - 1, bbox[2] - 1, bbox[3] + 1]
                dets.append({"image_id": img_id, "category_id": cat, "bbox": jit,
                             "score": round(0.9 - 0.1 * (aid % 7), 3)})
            aid += 1
        if i == 0:
            if kind == "coco":  # LVIS has no crowd annotations
                crowd = np.zeros((size, size), np.uint8)
                crowd[: int(20 * s), int(60 * s):] = 1
                anns.append({"id": aid, "image_id": img_id, "category_id": 1, "iscrowd": 1,
                             "segmentation": mask_to_rle(crowd.astype(bool)),
                             "area": float(crowd.sum()),
                             "bbox": [60 * s, 0, size - 60 * s, 20 * s]})
            anns.append({"id": aid + 1, "image_id": img_id, "category_id": 2, "iscrowd": 0,
                         "segmentation": [], "area": 0.0, "bbox": [0, 0, 0, 0]})
            if with_detections:  # a false positive
                dets.append({"image_id": img_id, "category_id": 1,
                             "bbox": [70 * s, 60 * s, 30 * s, 30 * s], "score": 0.05})
            aid += 2
    if kind == "lvis":
        for a in anns:
            a.pop("iscrowd", None)
    data = {"info": {"description": f"tiny {kind} test set"}, "images": images,
            "annotations": anns, "categories": cats, "licenses": []}
    ann_file = os.path.join(out_dir, f"tiny_{kind}.json")
    with open(ann_file, "w") as f:
        json.dump(data, f)
    det_file = os.path.join(out_dir, f"tiny_{kind}_dets.json")
    with open(det_file, "w") as f:
        json.dump(dets, f)
    return {"ann_file": ann_file, "img_dir": img_dir, "det_file": det_file}

