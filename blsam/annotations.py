"""COCO / LVIS-format annotation files, checked field by field: the one reader that training and
evaluation share.

Why: users' annotation files are hand-made and tool-made. A file is trusted nowhere: an RLE
whose counts sum to less than height x width decodes a mask of another size, ``iscrowd: "0"``
is truthy, a bbox of 1e39 becomes an infinite float32 prompt, polygon coordinates of 1e8 take
pycocotools minutes and gigabytes, string or list ids are tracebacks deep in a loop. Here a
file that cannot be used at all (not JSON, wrong shape, duplicate or non-integer image ids,
duplicate file names, images without a valid size, bad LVIS category fields) is refused with
one line (``AnnotationFileError``); a bad object is skipped and counted by reason
(``AnnotationCounts``), before pycocotools or LVIS ever sees it (``AnnotationSet.raw`` holds
only the kept objects).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import UserError
from .segmentation import (  # noqa: F401  (re-exported: one import for readers)
    AnnotationError,
    check_polygons,
    check_rle,
    is_int,
    mask_area,
    perimeter,
    rle_run_lengths,
    to_rle,
)

KINDS = ("coco", "lvis")
REQUIRED_KEYS = ("images", "annotations", "categories")
MAX_BYTES = 8 << 30  # LVIS v1 train is 1.1 GB; a larger file is a mistake, not a data set
MAX_IMAGE_SIDE = 100_000  # larger "images" are typos (pixels or ids swapped), not photos
MAX_BOX_VALUE = 1e7  # any bbox number beyond this is garbage, whatever the image size
AREA_TOL, BOX_TOL_PX = 0.01, 2.0  # decoded vs JSON: 1% of the area (>= 2 px), 2 px + 1% of side
LVIS_FREQUENCIES = ("r", "c", "f")
LVIS_IMAGE_LISTS = ("not_exhaustive_category_ids", "neg_category_ids")
EMPTY = "empty_object"  # no mask and a zero-size or no box: skipped, not bad


class AnnotationFileError(UserError):
    """An annotation file that cannot be used at all (one line, exit 2 in a CLI)."""


@dataclass(frozen=True)
class ImageEntry:
    """One checked image entry; ``file_name`` as ``image_file_name`` reads it."""

    id: int
    file_name: str
    height: int
    width: int


@dataclass(frozen=True)
class ObjectEntry:
    """One checked object. ``bbox`` XYWH: finite, w, h > 0, inside the image (tolerance); from
    the mask when the file has none. ``area`` None when the file has none. ``segmentation``: a
    checked polygon list or RLE dict, None when absent or empty (a box-only object)."""

    id: int
    image_id: int
    category_id: int | None
    bbox: tuple[float, float, float, float]
    area: float | None
    iscrowd: bool
    segmentation: Any


@dataclass
class AnnotationCounts:
    """Objects kept, and objects skipped by reason (``EMPTY``: an object with no mask and no
    box, as tools write deleted shapes, is counted but is not a bad one). ``objects``: every
    skipped object, ``{"id", "image_id", "reason", "detail"}`` (ids as the file has them)."""

    kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    objects: list[dict[str, Any]] = field(default_factory=list)

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def bad(self) -> int:
        """Skipped objects that are wrong, not merely empty."""
        return self.total_skipped - self.skipped.get(EMPTY, 0)

    def skip(self, reason: str, detail: str, ann: Any) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        get = ann.get if isinstance(ann, dict) else (lambda k: None)
        self.objects.append({"id": get("id"), "image_id": get("image_id"), "reason": reason,
                             "detail": detail})

    def summary(self) -> str:
        """One line: kept, and each reason with its count and first example."""
        first = {}
        for o in self.objects:
            first.setdefault(o["reason"], f"annotation {o['id']}: {o['detail']}")
        parts = [f"{n} {r} (e.g. {first[r]})" for r, n in sorted(self.skipped.items())]
        return f"{self.kept} kept, {self.total_skipped} skipped" + (
            ": " + "; ".join(parts) if parts else "")

    def as_dict(self) -> dict[str, Any]:
        """The record written into result / run files."""
        return {"kept": self.kept, "skipped": dict(sorted(self.skipped.items())),
                "total_skipped": self.total_skipped, "bad": self.bad}


@dataclass
class AnnotationSet:
    """A checked annotation file. ``raw``: the parsed JSON with ``annotations`` holding only the
    kept objects (``iscrowd`` as 0/1, ``bbox`` / ``area`` filled in when absent), for
    pycocotools / LVIS."""

    path: str
    kind: str  # "coco" | "lvis"
    images: dict[int, ImageEntry]
    objects_by_image: dict[int, list[ObjectEntry]]
    categories: dict[int, dict[str, Any]]
    counts: AnnotationCounts
    raw: dict[str, Any]


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def image_file_name(img: dict[str, Any]) -> str:
    """COCO: ``file_name``; LVIS: the last part of ``coco_url``."""
    if img.get("file_name"):
        return os.path.basename(img["file_name"]) if "coco_url" in img else img["file_name"]
    return img["coco_url"].rstrip("/").split("/")[-1]


def detect_kind(data: dict[str, Any]) -> str:
    """"lvis" when categories carry LVIS' ``frequency`` or images only have ``coco_url``."""
    cats = [c for c in data.get("categories") or [] if isinstance(c, dict)]
    imgs = [i for i in data.get("images") or [] if isinstance(i, dict)]
    if any("frequency" in c for c in cats[:50]):
        return "lvis"
    if imgs and all("file_name" not in im and "coco_url" in im for im in imgs[:50]):
        return "lvis"
    return "coco"


def _check_box(box: Any, h: int, w: int) -> tuple[float, float, float, float]:
    if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(map(is_number, box)):
        raise AnnotationError(f"bbox {str(box)[:60]} is not 4 numbers")
    x, y, bw, bh = (float(v) for v in box)
    if not all(math.isfinite(v) and abs(v) <= MAX_BOX_VALUE for v in (x, y, bw, bh)):
        raise AnnotationError(f"bbox {str(box)[:60]} has a non-finite or huge number")
    if bw <= 0 or bh <= 0:
        raise AnnotationError(f"bbox {str(box)[:60]} has no positive width and height")
    tx, ty = BOX_TOL_PX + 0.01 * w, BOX_TOL_PX + 0.01 * h
    if x < -tx or y < -ty or x + bw > w + tx or y + bh > h + ty:
        raise AnnotationError(f"bbox {str(box)[:60]} lies outside the {w}x{h} image")
    return x, y, bw, bh


def _check_object(ann: Any, images: dict[int, ImageEntry], cats: dict[int, Any]
                  ) -> ObjectEntry:
    """The checked entry, or ``_Skip`` with a reason; every field checked."""
    if not isinstance(ann, dict):
        raise _Skip("not_an_object", f"{type(ann).__name__} in 'annotations'")
    aid = ann.get("id")
    if not is_int(aid):
        raise _Skip("bad_id", f"id {str(aid)[:40]!r} is not an integer")
    if "image_id" not in ann:
        raise _Skip("missing_image_id", "no image_id")
    iid = ann["image_id"]
    if not is_int(iid):
        raise _Skip("bad_image_id", f"image_id {str(iid)[:40]!r} is not an integer")
    img = images.get(iid)
    if img is None:
        raise _Skip("unknown_image", f"image_id {iid} is not in 'images'")
    cid = ann.get("category_id")
    if cid is not None and not is_int(cid):
        raise _Skip("bad_category_id", f"category_id {str(cid)[:40]!r} is not an integer")
    if cid is not None and cid not in cats:
        raise _Skip("unknown_category", f"category_id {cid} is not in 'categories'")
    crowd = ann.get("iscrowd", 0)
    if not (isinstance(crowd, (int, bool)) and crowd in (0, 1)):
        raise _Skip("bad_iscrowd", f"iscrowd {str(crowd)[:40]!r} (0 or 1)")
    h, w = img.height, img.width
    area = ann.get("area")
    if area is not None and (not is_number(area) or not math.isfinite(area) or area < 0
                             or area > h * w * (1 + AREA_TOL)):
        raise _Skip("bad_area", f"area {str(area)[:40]!r} for a {w}x{h} "
                                f"image")
    seg = ann.get("segmentation")
    try:
        if isinstance(seg, list):
            check_polygons(seg, h, w)
            seg = seg or None
        elif isinstance(seg, dict):
            check_rle(seg, h, w)
        elif seg is not None:
            raise AnnotationError(f"segmentation is a {type(seg).__name__}")
    except AnnotationError as e:
        kind = "bad_polygon" if isinstance(seg, list) else "bad_rle" if isinstance(seg, dict) \
            else "bad_segmentation"
        raise _Skip(kind, str(e)) from None
    if "bbox" in ann:
        try:
            box = _check_box(ann["bbox"], h, w)
        except AnnotationError as e:
            if _zero_size(ann["bbox"]) and (seg is None or mask_area(seg, h, w) == 0):
                raise _Skip(EMPTY, f"no mask, bbox {ann['bbox']}") from None
            raise _Skip("bad_bbox", str(e)) from None
    elif seg is None:
        raise _Skip(EMPTY, "neither bbox nor segmentation")
    else:
        from pycocotools import mask as mask_utils

        box = tuple(float(v) for v in mask_utils.toBbox(to_rle(seg, h, w)))
        if box[2] <= 0 or box[3] <= 0:
            raise _Skip(EMPTY, "no bbox and an empty mask")
    return ObjectEntry(aid, iid, cid, box, None if area is None else float(area),
                       bool(crowd), seg)


def _zero_size(box: Any) -> bool:
    """4 finite numbers >= 0 with a zero width or height: an empty box, not a wrong one."""
    ok = isinstance(box, (list, tuple)) and len(box) == 4 and all(map(is_number, box))
    return ok and all(0 <= v <= MAX_BOX_VALUE for v in box) and min(box[2], box[3]) == 0


class _Skip(Exception):
    def __init__(self, reason: str, example: str) -> None:
        super().__init__(example)
        self.reason, self.example = reason, example


def _read(path: str, max_bytes: int) -> Any:
    if not os.path.isfile(path):
        raise AnnotationFileError(f"annotation file not found: {path}")
    size = os.path.getsize(path)
    if size > max_bytes:
        raise AnnotationFileError(f"{path!r} is {size / 2**30:.1f} GiB, more than the "
                                  f"{max_bytes / 2**30:.1f} GiB an annotation file may be")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise AnnotationFileError(f"{path!r} is not a JSON file: {e}") from None
    except OSError as e:
        raise AnnotationFileError(f"cannot read {path!r}: {e}") from None


def _check_top(data: Any, path: str) -> None:
    if not isinstance(data, dict):
        raise AnnotationFileError(
            f"{path!r} is not a COCO/LVIS annotation file: top level is a "
            f"{type(data).__name__}, expected an object with keys {list(REQUIRED_KEYS)}"
            + (" (a list looks like a detection results file)" if isinstance(data, list) else ""))
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise AnnotationFileError(f"{path!r} is not a COCO/LVIS annotation file: missing "
                                  f"key(s) {missing} (found {sorted(map(str, data))[:10]})")
    for k in REQUIRED_KEYS:
        if not isinstance(data[k], list):
            raise AnnotationFileError(f"{path!r}: '{k}' must be a list, got "
                                      f"{type(data[k]).__name__}")


def _image_size(v: Any) -> int | None:
    if is_int(v):
        return v
    if isinstance(v, float) and v.is_integer():  # some tools write 480.0
        return int(v)
    return None


def _check_images(data: dict[str, Any], path: str) -> dict[int, ImageEntry]:
    images: dict[int, ImageEntry] = {}
    names: dict[str, int] = {}
    dup_ids, dup_names = [], []
    for im in data["images"]:
        if not isinstance(im, dict):
            raise AnnotationFileError(f"{path!r}: an image entry is a {type(im).__name__}")
        iid = im.get("id")
        if not is_int(iid):
            raise AnnotationFileError(f"{path!r}: image id {str(iid)[:40]!r} is not an integer")
        h, w = _image_size(im.get("height")), _image_size(im.get("width"))
        if h is None or w is None or h <= 0 or w <= 0:
            raise AnnotationFileError(f"{path!r}: image {iid} needs a positive integer height "
                                      f"and width, has {str(im.get('height'))[:20]!r} x "
                                      f"{str(im.get('width'))[:20]!r}")
        if max(h, w) > MAX_IMAGE_SIDE:
            raise AnnotationFileError(f"{path!r}: image {iid} claims an absurd size {w}x{h} "
                                      f"(sides up to {MAX_IMAGE_SIDE})")
        fn, url = im.get("file_name"), im.get("coco_url")
        if not (isinstance(fn, str) and fn) and not (isinstance(url, str) and url):
            raise AnnotationFileError(f"{path!r}: image {iid} has neither a file_name nor a "
                                      f"coco_url string")
        if iid in images:
            dup_ids.append(iid)
            continue
        name = image_file_name(im)
        if name in names:
            dup_names.append(f"{name} (ids {names[name]} and {iid})")
        names[name] = iid
        images[iid] = ImageEntry(iid, name, h, w)
    if dup_ids:  # one image's pixels would be scored against the other's masks
        raise AnnotationFileError(f"{path!r}: {len(set(dup_ids))} image id(s) listed more than "
                                  f"once, e.g. {sorted(set(dup_ids))[:5]}")
    if dup_names:
        raise AnnotationFileError(f"{path!r}: {len(dup_names)} file name(s) used by more than "
                                  f"one image, e.g. {', '.join(dup_names[:3])}")
    return images


def _check_categories(data: dict[str, Any], path: str, kind: str) -> dict[int, dict[str, Any]]:
    cats: dict[int, dict[str, Any]] = {}
    for c in data["categories"]:
        cid = c.get("id") if isinstance(c, dict) else None
        if not is_int(cid):
            raise AnnotationFileError(f"{path!r}: category {str(c)[:60]} has no integer id")
        if cid in cats:
            raise AnnotationFileError(f"{path!r}: category id {cid} listed more than once")
        if kind == "lvis" and "frequency" in c and c["frequency"] not in LVIS_FREQUENCIES:
            raise AnnotationFileError(f"{path!r}: category {cid} has LVIS frequency "
                                      f"{str(c['frequency'])[:20]!r}, not one of "
                                      f"{list(LVIS_FREQUENCIES)}")
        cats[cid] = c
    return cats


def _check_lvis_images(data: dict[str, Any], path: str, cats: dict[int, Any]) -> None:
    """LVIS' federated fields, checked now rather than after a whole evaluation pass."""
    for im in data["images"]:
        for key in LVIS_IMAGE_LISTS:
            if key not in im:
                continue
            v = im[key]
            if not isinstance(v, list) or not all(is_int(c) and c in cats for c in v):
                raise AnnotationFileError(f"{path!r}: image {im['id']}: '{key}' must be a list "
                                          f"of known category ids, got {str(v)[:60]}")


def _raw_entry(ann: dict[str, Any], obj: ObjectEntry, img: ImageEntry) -> dict[str, Any]:
    """The kept object as pycocotools / LVIS read it: iscrowd 0/1, bbox and area present."""
    fix: dict[str, Any] = {}
    if type(ann.get("iscrowd")) is not int:  # absent, or a JSON true / false
        fix["iscrowd"] = int(obj.iscrowd)
    if "bbox" not in ann:
        fix["bbox"] = list(obj.bbox)
    if obj.area is None:
        if obj.segmentation is not None:
            from pycocotools import mask as mask_utils

            fix["area"] = float(mask_utils.area(to_rle(obj.segmentation, img.height, img.width)))
        else:
            fix["area"] = obj.bbox[2] * obj.bbox[3]
    return dict(ann, **fix) if fix else ann


def load_annotation_file(path: str, kind: str | None = None, *,
                         max_bytes: int = MAX_BYTES) -> AnnotationSet:
    """Read and check a COCO / LVIS instances file (``kind`` None: detected). A file that
    cannot be used is refused (``AnnotationFileError``); bad objects are skipped and counted."""
    path = os.fspath(path)
    if kind is not None and kind not in KINDS:
        raise AnnotationFileError(f"annotation kind must be one of {KINDS}, got {kind!r}")
    data = _read(path, max_bytes)
    _check_top(data, path)
    found = detect_kind(data)
    if kind is not None and kind != found:
        if kind == "lvis":
            raise AnnotationFileError(f"--dataset lvis, but {path!r} looks like COCO "
                                      f"(categories have no 'frequency'); use --dataset coco")
        raise AnnotationFileError(
            f"--dataset coco, but {path!r} looks like LVIS (categories have 'frequency' or "
            f"images only a coco_url); use --dataset lvis (COCOeval on LVIS is not LVIS AP)")
    kind = kind or found
    images = _check_images(data, path)
    cats = _check_categories(data, path, kind)
    if kind == "lvis":
        _check_lvis_images(data, path, cats)
    counts = AnnotationCounts()
    by_image: dict[int, list[ObjectEntry]] = {}
    raw_anns = []
    seen: set = set()
    for ann in data["annotations"]:
        try:
            obj = _check_object(ann, images, cats)
            if obj.id in seen:
                raise _Skip("duplicate_id", "its id is used by an earlier annotation")
        except _Skip as s:
            counts.skip(s.reason, s.example, ann)
            continue
        seen.add(obj.id)
        counts.kept += 1
        by_image.setdefault(obj.image_id, []).append(obj)
        raw_anns.append(_raw_entry(ann, obj, images[obj.image_id]))
    for objs in by_image.values():
        objs.sort(key=lambda o: o.id)
    raw = dict(data, annotations=raw_anns)
    return AnnotationSet(path, kind, images, by_image, cats, counts, raw)


def decode_object_mask(obj: ObjectEntry, image: ImageEntry) -> np.ndarray:
    """Bool (h, w) mask of a checked object; ``ValueError`` when it has no mask, decodes empty,
    or disagrees with the file's own ``area`` (1%, >= 2 px; polygons also half a pixel per
    unit of perimeter, as tools compute the polygon's area, pycocotools its pixels) or ``bbox``
    (2 px + 1% of the side)."""
    from pycocotools import mask as mask_utils

    if obj.segmentation is None:
        raise ValueError(f"object {obj.id} has no mask")
    h, w = image.height, image.width
    rle = to_rle(obj.segmentation, h, w)
    mask = mask_utils.decode(rle).astype(bool)
    area = int(mask.sum())
    if area == 0:
        raise ValueError(f"object {obj.id}: empty mask")
    if obj.area is not None:
        tol = max(2.0, AREA_TOL * area)
        if isinstance(obj.segmentation, list):
            tol += 0.5 * sum(perimeter(r) for r in obj.segmentation)
        if abs(area - obj.area) > tol:
            raise ValueError(f"object {obj.id}: decoded area {area} != file area {obj.area:g}")
    box = np.asarray(mask_utils.toBbox(rle), np.float64)
    if np.abs(box - np.asarray(obj.bbox)).max() > BOX_TOL_PX + 0.01 * max(h, w):
        raise ValueError(f"object {obj.id}: decoded box {box.tolist()} != file bbox "
                         f"{list(obj.bbox)}")
    return mask
