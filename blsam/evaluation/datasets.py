"""COCO / LVIS annotation files for evaluation: the shared checked reader
(``blsam.annotations``), image lookup, masks and detections.

Why every annotation is checked: a wrong ``--ann-file`` (a results file, a SA-1B json, a typo'd
path) would otherwise surface as a ``KeyError`` deep in the loop, and one bad object (a short
RLE, ``iscrowd: "0"``, a bbox of 1e39, polygon coordinates of 1e8) as a wrong mIoU or minutes
inside pycocotools. Bad objects never reach the loop nor pycocotools: refused, or skipped and
counted under ``--skip-bad-images``.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from ..annotations import (
    EMPTY,
    MAX_BOX_VALUE,
    AnnotationCounts,
    AnnotationFileError,
    ObjectEntry,
    detect_kind,  # noqa: F401  (re-exported)
    image_file_name,
    is_int,
    load_annotation_file,
)

COCO_SPLIT_DIRS = ("val2017", "train2017")


class DatasetError(AnnotationFileError):
    """An annotation, image or detection file that cannot be evaluated."""


@dataclass
class EvalDataset:
    """An annotation file as loaded, plus the indexes the evaluation loop needs."""

    path: str
    kind: str  # "coco" or "lvis"
    raw: dict[str, Any]
    images: list[dict[str, Any]]  # sorted by id: the order every rank and every model uses
    anns_by_image: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    categories: dict[int, dict[str, Any]] = field(default_factory=dict)
    # ``blsam.annotations``' counts, and the skipped objects of each image: {"bad", "empty"}
    annotation_counts: AnnotationCounts = field(default_factory=AnnotationCounts)
    skipped_by_image: dict[int, dict[str, int]] = field(default_factory=dict)

    @property
    def image_ids(self) -> list[int]:
        return [img["id"] for img in self.images]


def has_geometry(ann: dict[str, Any]) -> bool:
    """Whether an annotation has a polygon (>= 3 points) or an RLE to rasterise."""
    seg = ann.get("segmentation")
    if isinstance(seg, list):
        return any(len(p) >= 6 for p in seg)
    return isinstance(seg, dict) and "counts" in seg


def _bad_box(box: Any) -> bool:
    """A box that cannot be a prompt: not 4 finite numbers (float32 ones too: a bbox of 1e39
    is an infinite prompt), or zero / negative width or height."""
    if not isinstance(box, (list, tuple)) or len(box) != 4 \
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box):
        return True
    x, y, w, h = (float(v) for v in box)
    return not all(np.isfinite([x, y, w, h])) or max(map(abs, (x, y, w, h))) > MAX_BOX_VALUE \
        or w <= 0 or h <= 0


def _ann_dict(o: ObjectEntry) -> dict[str, Any]:
    """A checked object as the loop reads it (``iscrowd`` 0/1, ``segmentation`` [] when the
    file has none, ``area`` only when the file has one)."""
    d = {"id": o.id, "image_id": o.image_id, "category_id": o.category_id,
         "bbox": list(o.bbox), "iscrowd": int(o.iscrowd),
         "segmentation": o.segmentation if o.segmentation is not None else []}
    if o.area is not None:
        d["area"] = o.area
    return d


def load_dataset(path: str, kind: str | None = None) -> EvalDataset:
    """Load and check every entry of a COCO or LVIS instances file (``kind`` None: detect
    it): ``blsam.annotations.load_annotation_file``, its refusals as ``DatasetError``. An
    object without a category cannot be scored by COCOeval / LVISEval: skipped and counted."""
    try:
        aset = load_annotation_file(os.fspath(path), kind)
    except AnnotationFileError as e:
        raise DatasetError(str(e)) from None
    counts = aset.counts
    by_image: dict[int, list[dict[str, Any]]] = {}
    no_cat = set()
    for iid, objs in aset.objects_by_image.items():
        for o in objs:
            if o.category_id is None:
                counts.kept -= 1
                counts.skip("no_category", "no category_id (COCOeval / LVISEval need one)",
                            {"id": o.id, "image_id": iid})
                no_cat.add(o.id)
                continue
            by_image.setdefault(iid, []).append(_ann_dict(o))
    raw = aset.raw
    if no_cat:
        raw = dict(raw, annotations=[a for a in raw["annotations"] if a["id"] not in no_cat])
    skipped: dict[int, dict[str, int]] = {}
    for b in counts.objects:
        if is_int(b["image_id"]) and b["image_id"] in aset.images:
            c = skipped.setdefault(b["image_id"], {"bad": 0, "empty": 0})
            c["empty" if b["reason"] == EMPTY else "bad"] += 1
    images = sorted((dict(im, height=aset.images[im["id"]].height,
                          width=aset.images[im["id"]].width) for im in raw["images"]),
                    key=lambda im: im["id"])
    raw = dict(raw, images=images)  # sizes as integers for pycocotools too
    return EvalDataset(aset.path, aset.kind, raw, images, by_image, aset.categories, counts,
                       skipped)


def check_lvis_eval_fields(data: dict[str, Any], path: str = "annotation file") -> None:
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


def resolve_image_path(img_dir: str, img: dict[str, Any]) -> str | None:
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


def check_image_file(path: str) -> str | None:
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


def size_problem(height: int, width: int) -> str | None:
    """Why an image the annotation file says is ``width`` x ``height`` is not decoded (over
    PIL's pixel limit), or None: checked before its file is opened."""
    from blsam.utils.images import check_pixels

    try:
        check_pixels(width, height, "the annotation file says it")
    except ValueError as e:
        return str(e)
    return None


def read_image_oriented(path: str, height: int | None = None, width: int | None = None,
                        exif: str = "ignore") -> tuple[np.ndarray, int]:
    """RGB uint8 HxWx3 (``blsam.utils.images.decode_rgb``: the training reader) and the file's
    EXIF orientation (1: none), checked to be whole and, when given, of the size the annotation
    file claims; errors as ``DatasetError``. A size that matches only the other reading of the
    EXIF tag is said so, with the option that reads it that way."""
    from blsam.utils.images import SWAPS_SIDES, decode_rgb

    problem = check_image_file(path)
    if problem is None and height is not None:
        problem = size_problem(height, width)
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


def read_image(path: str, height: int | None = None, width: int | None = None,
               exif: str = "ignore") -> np.ndarray:
    """``read_image_oriented`` without the orientation."""
    return read_image_oriented(path, height, width, exif)[0]


def find_bad_annotations(dataset: EvalDataset, image_ids: Any) -> list[dict[str, Any]]:
    """The objects ``blsam.annotations`` skipped as wrong (not merely empty) in the given
    images, and those it could not place in any image (a missing, non-integer or unknown
    ``image_id``): ``{"id", "image_id", "reason", "detail"}``."""
    ids, known = set(image_ids), set(dataset.image_ids)
    return [b for b in dataset.annotation_counts.objects if b["reason"] != EMPTY
            and (b["image_id"] in ids or not (is_int(b["image_id"]) and b["image_id"] in known))]


def ann_to_rle(segmentation: Any, height: int, width: int) -> dict[str, Any]:
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


def ann_to_mask(ann: dict[str, Any], height: int, width: int) -> np.ndarray:
    """Boolean HxW mask of an annotation."""
    return mask_utils.decode(ann_to_rle(ann["segmentation"], height, width)).astype(bool)


def mask_to_rle(mask: np.ndarray) -> dict[str, Any]:
    """JSON-ready compressed RLE (``counts`` as str), the COCO results format."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def load_detections(path: str, dataset: EvalDataset, max_per_image: int | None = None,
                    info: dict[str, Any] | None = None) -> dict[int, list[dict[str, Any]]]:
    """COCO-format detection results grouped by image, sorted by descending score, the best
    ``max_per_image`` kept (COCO's 100, LVIS' 300: a 20k-detection file is not decoded 20k
    times for results the evaluator drops); ``info`` gets the counts.

    Detections for images the annotation file does not have are an error: they mean the wrong
    detection file (e.g. test-dev boxes against val annotations).
    """
    if not os.path.isfile(path):
        raise DatasetError(f"detection file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
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
    by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for i, d in enumerate(dets):
        where = f"detection {i} in {path!r}"
        if not isinstance(d, dict):
            raise DatasetError(f"{where} is a {type(d).__name__}, not an object")
        for key in ("image_id", "category_id", "bbox", "score"):
            if key not in d:
                raise DatasetError(f"{where} has no '{key}': {str(d)[:200]}")
        for key in ("image_id", "category_id"):
            if not is_int(d[key]):
                raise DatasetError(f"{where}: {key} {str(d[key])[:40]!r} is not an integer")
        if _bad_box(d["bbox"]):
            raise DatasetError(f"{where} has an empty or invalid box {str(d['bbox'])[:80]} "
                               f"(XYWH, finite, width and height must be > 0)")
        if not isinstance(d["score"], (int, float)) or isinstance(d["score"], bool) \
                or not np.isfinite(d["score"]):
            raise DatasetError(f"{where} has a non-numeric score {str(d['score'])[:40]!r}")
        if d["image_id"] not in ids:
            unknown.add(d["image_id"])
            continue
        if d["category_id"] not in dataset.categories:
            raise DatasetError(f"{where}: unknown category {d['category_id']}")
        by_image[d["image_id"]].append(d)
    if unknown:
        raise DatasetError(
            f"detection file {path!r} has detections for {len(unknown)} image id(s) not in "
            f"{dataset.path!r}, e.g. {sorted(unknown)[:5]}: wrong detection or annotation file?"
        )
    for v in by_image.values():
        v.sort(key=lambda d: -float(d["score"]))  # stable: ties keep file order
    total = sum(map(len, by_image.values()))
    if max_per_image is not None:
        by_image = {k: v[:max_per_image] for k, v in by_image.items()}
    if info is not None:
        info.update(detections_in_file=len(dets), max_per_image=max_per_image,
                    detections_kept=sum(map(len, by_image.values())),
                    detections_dropped_over_max=total - sum(map(len, by_image.values())))
    return dict(by_image)
