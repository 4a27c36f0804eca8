"""COCO / LVIS annotation files: loading, validation, image lookup, masks and detections.

Why validation here: a wrong ``--ann-file`` (a results file, a SA-1B json, a typo'd path) would
otherwise surface as a ``KeyError`` deep in the loop or, worse, as an mIoU over nothing.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from pycocotools import mask as mask_utils

from ..errors import UserError

REQUIRED_KEYS = ("images", "annotations", "categories")
COCO_SPLIT_DIRS = ("val2017", "train2017")


class DatasetError(UserError):
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
        raise DatasetError(
            f"--dataset coco, but {path!r} looks like LVIS (categories have 'frequency' or "
            f"images only a coco_url); use --dataset lvis (COCOeval on LVIS is not LVIS AP)"
        )
    return kind or found


def has_geometry(ann: Dict[str, Any]) -> bool:
    """Whether an annotation has a polygon (>= 3 points) or an RLE to rasterise."""
    seg = ann.get("segmentation")
    if isinstance(seg, list):
        return any(len(p) >= 6 for p in seg)
    return isinstance(seg, dict) and "counts" in seg


def _bad_box(box: Any) -> bool:
    """A box that cannot be a prompt: not 4 finite numbers, or zero / negative width or height."""
    try:
        x, y, w, h = (float(v) for v in box)
    except (TypeError, ValueError):
        return True
    return not all(np.isfinite([x, y, w, h])) or w <= 0 or h <= 0


def load_dataset(path: str, kind: Optional[str] = None) -> EvalDataset:
    """Load and validate a COCO or LVIS instances file (``kind`` None: detect it)."""
    path = os.fspath(path)
    data = _read_json(path)
    kind = validate_dataset(data, path, kind)
    images = sorted(data["images"], key=lambda im: im["id"])
    ids = {im["id"] for im in images}
    if len(ids) != len(images):  # one image's pixels would be scored against the other's masks
        seen, dup = set(), []
        for im in images:
            if im["id"] in seen and im["id"] not in dup:
                dup.append(im["id"])
            seen.add(im["id"])
        raise DatasetError(f"{path!r}: {len(dup)} image id(s) listed more than once, e.g. "
                           f"{dup[:5]}")
    by_name: Dict[str, Any] = {}
    dup_names = []
    for im in images:
        if not (im.get("file_name") or im.get("coco_url")):
            continue
        name = image_file_name(im)
        if name in by_name:
            dup_names.append(f"{name} (ids {by_name[name]} and {im['id']})")
        by_name[name] = im["id"]
    if dup_names:
        raise DatasetError(f"{path!r}: {len(dup_names)} file name(s) used by more than one "
                           f"image, e.g. {', '.join(dup_names[:3])}")
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


def check_image_file(path: str) -> Optional[str]:
    """Why ``path`` cannot be a whole image, or None. Reads only the file's ends.

    Why: OpenCV decodes a truncated JPEG without an error (the missing rows come out gray), so a
    half-copied dataset would be evaluated silently. A JPEG must start with SOI and end with
    EOI (``FF D9``; entropy-coded data cannot contain it), a PNG must end with its IEND chunk.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            f.seek(max(0, size - 4096))
            tail = f.read()
    except OSError as e:
        return f"cannot read: {e}"
    if size == 0:
        return "empty file"
    if head[:2] == b"\xff\xd8" and b"\xff\xd9" not in tail:
        return "truncated JPEG (no end-of-image marker)"
    if head == b"\x89PNG\r\n\x1a\n" and b"IEND" not in tail:
        return "truncated PNG (no IEND chunk)"
    return None


def read_image_oriented(path: str, height: Optional[int] = None, width: Optional[int] = None,
                        exif: str = "ignore") -> Tuple[np.ndarray, int]:
    """RGB uint8 HxWx3 (``blsam.utils.images.decode_rgb``: the training reader) and the file's
    EXIF orientation (1: none), checked to be whole and, when given, of the size the annotation
    file claims; errors as ``DatasetError``. A size that matches only the other reading of the
    EXIF tag is said so, with the option that reads it that way."""
    from blsam.utils.images import SWAPS_SIDES, decode_rgb

    problem = check_image_file(path)
    if problem is not None:
        raise DatasetError(f"image {path!r}: {problem}")
    if not os.path.isfile(path):
        raise DatasetError(f"image not found: {path}")
    try:
        pixels, orientation = decode_rgb(path, exif)
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"cannot decode image {path!r} (not an image, or corrupt): {e}") \
            from e
    if height is not None and pixels.shape[:2] != (height, width):
        msg = (f"image {path!r} is {pixels.shape[1]}x{pixels.shape[0]}, but the annotation "
               f"file says {width}x{height}")
        if orientation in SWAPS_SIDES and pixels.shape[:2] == (width, height):
            other = "apply" if exif == "ignore" else "ignore"
            msg += (f"; it matches only with its EXIF orientation {orientation} "
                    f"{'applied' if other == 'apply' else 'ignored'}: "
                    f"--exif-orientation {other}")
        raise DatasetError(msg)
    return pixels, orientation


def read_image(path: str, height: Optional[int] = None, width: Optional[int] = None,
               exif: str = "ignore") -> np.ndarray:
    """``read_image_oriented`` without the orientation."""
    return read_image_oriented(path, height, width, exif)[0]


def polygon_problem(seg: Any) -> Optional[str]:
    """Why a polygon segmentation cannot be rasterised as drawn, or None (an empty list is an
    empty annotation, not a bad one)."""
    if not isinstance(seg, list):
        return None
    for ring in seg:
        if not isinstance(ring, (list, tuple)):
            return f"polygon ring is a {type(ring).__name__}, not a list of coordinates"
        if len(ring) < 6 or len(ring) % 2:
            return f"degenerate polygon ring of {len(ring)} coordinates (needs an even number >= 6)"
        try:
            if not np.all(np.isfinite(np.asarray(ring, dtype=np.float64))):
                return "polygon with a non-finite coordinate"
        except (TypeError, ValueError):
            return "polygon with a non-numeric coordinate"
    return None


def find_bad_annotations(dataset: "EvalDataset", image_ids: Any, boxes: bool
                         ) -> Dict[int, Dict[str, Any]]:
    """Annotations of the given images that cannot be evaluated as drawn, by id:
    ``{"id", "image_id", "reason", "box_only"}``. A degenerate polygon spoils the object for
    every protocol; a zero-size / invalid ``bbox`` on an object with a mask only for the box
    protocol (checked when ``boxes``)."""
    bad: Dict[int, Dict[str, Any]] = {}
    for img_id in image_ids:
        for ann in dataset.anns_by_image.get(img_id, []):
            why = polygon_problem(ann.get("segmentation"))
            box_only = False
            if why is None and boxes and "bbox" in ann and has_geometry(ann) \
                    and _bad_box(ann["bbox"]):
                why, box_only = (f"empty or invalid bbox {ann['bbox']} (width and height must "
                                 f"be > 0)"), True
            if why is not None:
                bad[ann["id"]] = {"id": ann["id"], "image_id": img_id, "reason": why,
                                  "box_only": box_only}
    return bad


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
    if not dets:
        raise DatasetError(f"detection file {path!r} holds no detections: AP would be 0 for "
                           f"lack of input, not of masks")
    ids = set(dataset.image_ids)
    unknown = set()
    by_image: Dict[int, List[Dict[str, Any]]] = defaultdict(list)
    for i, d in enumerate(dets):
        for key in ("image_id", "category_id", "bbox", "score"):
            if key not in d:
                raise DatasetError(f"detection {i} in {path!r} has no '{key}': {str(d)[:200]}")
        if _bad_box(d["bbox"]):
            raise DatasetError(f"detection {i} in {path!r} has an empty or invalid box "
                               f"{d['bbox']} (XYWH, width and height must be > 0)")
        if not isinstance(d["score"], (int, float)) or not np.isfinite(d["score"]):
            raise DatasetError(f"detection {i} in {path!r} has a non-numeric score {d['score']!r}")
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
