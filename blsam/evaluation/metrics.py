"""Metrics: per-annotation mask IoU, mIoU by COCO object size, and COCO/LVIS mask AP.

Why thin wrappers around pycocotools/lvis instead of our own AP: AP numbers are only
comparable with the paper's Table 2 (and SAM's) when computed by the reference evaluators.
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from .datasets import has_geometry

SMALL, MEDIUM = 32 ** 2, 96 ** 2  # COCO size thresholds on annotation area
SIZES = ("small", "medium", "large")


def mask_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    pred = pred.astype(bool)
    gt = gt.astype(bool)
    union = np.logical_or(pred, gt).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(pred, gt).sum() / union)


def batch_mask_iou(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """IoU of (..., H, W) boolean masks pairwise along the leading axes (broadcasting)."""
    inter = np.logical_and(pred, gt).sum(axis=(-2, -1)).astype(np.float64)
    union = np.logical_or(pred, gt).sum(axis=(-2, -1)).astype(np.float64)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def size_of(area: float) -> str:
    """COCO's object size bucket for an annotation area (pixels)."""
    if area < SMALL:
        return "small"
    if area < MEDIUM:
        return "medium"
    return "large"


def summarize_miou(records: Iterable[dict[str, Any]], key: str = "iou") -> dict[str, Any]:
    """mIoU over all records and per size; records carry ``key`` and ``size``.

    Values are fractions in [0, 1] (Table 2 prints them x100); a size with no object is None.
    """
    buckets: dict[str, list[float]] = defaultdict(list)
    for r in records:
        buckets["all"].append(float(r[key]))
        buckets[r["size"]].append(float(r[key]))
    out: dict[str, Any] = {"mIoU": float(np.mean(buckets["all"])) if buckets["all"] else None}
    for s in SIZES:
        out[f"mIoU_{s}"] = float(np.mean(buckets[s])) if buckets[s] else None
    out["num_masks"] = len(buckets["all"])
    out.update({f"num_{s}": len(buckets[s]) for s in SIZES})
    return out


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """pycocotools/lvis print and log a lot; keep the progress bar and our summary readable."""
    log = logging.getLogger("lvis")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        log.setLevel(level)


def _nan_to_none(v: float) -> float | None:
    v = float(v)
    return None if v < 0 or np.isnan(v) else v


COCO_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def coco_segm_eval(
    gt_dataset: dict[str, Any], results: Sequence[dict[str, Any]],
    img_ids: Sequence[int] | None = None,
) -> dict[str, float | None]:
    """COCO mask AP (pycocotools COCOeval, iouType segm) in percent, over ``img_ids`` (default:
    all images of the annotation file; pass the evaluated ones when using ``--limit``)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with _quiet():
        gt = COCO()
        gt.dataset = _drop_empty_gt(gt_dataset)
        for ann in gt.dataset["annotations"]:  # COCOeval reads iscrowd; LVIS files lack it
            ann.setdefault("iscrowd", 0)
        gt.createIndex()
        ids = sorted(img_ids) if img_ids is not None else sorted(gt.getImgIds())
        if not results:
            return {k: 0.0 for k in COCO_STAT_NAMES}
        dt = gt.loadRes(_results_for_eval(results))
        ev = COCOeval(gt, dt, iouType="segm")
        ev.params.imgIds = ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: _nan_to_none(v * 100 if v >= 0 else v) for k, v in zip(COCO_STAT_NAMES, ev.stats)}


def _drop_empty_gt(gt_dataset: dict[str, Any]) -> dict[str, Any]:
    """A copy without annotations that have no polygon/RLE (the evaluators cannot rasterize
    them; the mIoU protocols skip and count them the same way)."""
    out = dict(gt_dataset)
    out["annotations"] = [copy.deepcopy(a) for a in gt_dataset["annotations"]
                          if has_geometry(a)]
    out["images"] = copy.deepcopy(gt_dataset["images"])
    out["categories"] = copy.deepcopy(gt_dataset["categories"])
    return out


def _results_for_eval(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies with only the evaluated fields: without ``bbox`` the evaluators take a mask's
    area from the mask (with it they use the box area for the size ranges)."""
    keep = ("image_id", "category_id", "segmentation", "score")
    return [{k: copy.deepcopy(r[k]) for k in keep} for r in results]


def top_k_per_image(results: Sequence[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """At most ``k`` results per image, highest scores first (LVIS' 300-per-image rule)."""
    by_img: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        by_img[r["image_id"]].append(r)
    out: list[dict[str, Any]] = []
    for img_id in sorted(by_img):
        out += sorted(by_img[img_id], key=lambda r: -float(r["score"]))[:k]
    return out


LVIS_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")


def lvis_segm_eval(
    gt_dataset: dict[str, Any], results: Sequence[dict[str, Any]],
    img_ids: Sequence[int] | None = None, max_dets: int = 300,
) -> dict[str, float | None]:
    """LVIS mask AP (lvis-api LVISEval, federated) in percent, top ``max_dets`` per image."""
    from .datasets import check_lvis_eval_fields
    from .lvis_compat import import_lvis, lvis_from_dict

    check_lvis_eval_fields(gt_dataset)
    _, LVISResults, LVISEval = import_lvis()
    if not results:
        return {k: 0.0 for k in LVIS_STAT_NAMES}
    with _quiet():
        gt = lvis_from_dict(_drop_empty_gt(gt_dataset), copy_data=False)
        dets = top_k_per_image(_results_for_eval(results), max_dets)
        dt = LVISResults(gt, dets, max_dets=max_dets)
        ev = LVISEval(gt, dt, iou_type="segm")
        if img_ids is not None:
            ev.params.img_ids = sorted(img_ids)
        ev.params.max_dets = max_dets
        ev.run()
    return {k: _nan_to_none(ev.results[k] * 100 if ev.results[k] >= 0 else ev.results[k])
            for k in LVIS_STAT_NAMES}
