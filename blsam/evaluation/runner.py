"""The per-image loop: encode each image once, decode all of its prompts in batches.

Why per-image batching: the image encoder is the expensive part (and the part the paper changes);
the decoder is cheap, so one ``set_image`` per image and B prompts per decoder call make the
evaluation cost ~ one encoder pass per image, as in SAM's own evaluation.

Every output item carries a sort key (image position, prompt index) so that the shards of a
torchrun job merge into exactly the list one process would produce.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .datasets import (
    DatasetError,
    EvalDataset,
    ann_to_mask,
    mask_to_rle,
    read_image,
    resolve_image_path,
)
from .metrics import batch_mask_iou, coco_segm_eval, lvis_segm_eval, size_of, summarize_miou
from .prompts import correction_click, object_points, xywh_to_xyxy

PROMPTS = ("point", "box", "detector")


@dataclass
class ProtocolConfig:
    """What to prompt with and how to pick the mask (see docs/evaluation.md)."""

    prompt: str = "point"
    num_points: int = 1
    point_from: str = "random"  # "random" (paper) or "center" (SAM paper's center click)
    oracle: bool = False  # 1 point: take the multimask output closest to GT instead of best score
    num_clicks: int = 0  # extra correction clicks after the first prediction
    seed: int = 0
    batch_prompts: int = 64
    max_dets: Optional[int] = None  # per image, highest scores first (LVIS: 300)
    skip_missing_images: bool = False
    save_predictions: bool = False

    def validate(self) -> None:
        if self.prompt not in PROMPTS:
            raise ValueError(f"prompt must be one of {PROMPTS}, got {self.prompt!r}")
        if self.num_points < 1:
            raise ValueError("--num-points must be >= 1")
        if self.batch_prompts < 1:
            raise ValueError("--batch-prompts must be >= 1")
        if self.num_clicks < 0:
            raise ValueError("--num-clicks must be >= 0")
        if self.num_clicks and self.prompt == "detector":
            raise ValueError("--num-clicks needs GT masks: use it with --prompt point or box")


def _chunks(items: Iterable[Any], n: int) -> Iterator[List[Any]]:
    it = iter(items)
    while True:
        chunk = list(itertools.islice(it, n))
        if not chunk:
            return
        yield chunk


def _has_geometry(ann: Dict[str, Any]) -> bool:
    seg = ann.get("segmentation")
    if isinstance(seg, list):
        return any(len(p) >= 6 for p in seg)
    return isinstance(seg, dict) and "counts" in seg


class Evaluator:
    """Runs one protocol over a list of images with a ``SamPredictor``."""

    def __init__(self, predictor: Any, dataset: EvalDataset, img_dir: str, cfg: ProtocolConfig,
                 detections: Optional[Dict[int, List[Dict[str, Any]]]] = None) -> None:
        cfg.validate()
        if cfg.prompt == "detector" and detections is None:
            raise ValueError("the detector protocol needs detections (--det-file)")
        self.predictor = predictor
        self.dataset = dataset
        self.img_dir = img_dir
        self.cfg = cfg
        self.detections = detections or {}
        self.device = predictor.device

    # ------------------------------------------------------------------ decoding
    def _decode(self, coords: Optional[np.ndarray], labels: Optional[np.ndarray],
                boxes: Optional[np.ndarray], multimask: bool,
                mask_input: Optional[torch.Tensor] = None
                ) -> Tuple[np.ndarray, np.ndarray, torch.Tensor]:
        """Batched SAM decoding from prompts in original-image pixels: masks (B, C, H, W) bool,
        predicted IoUs (B, C), low-res logits (B, C, h, w)."""
        p = self.predictor
        size = p.original_size
        pc = pl = bx = None
        if coords is not None:
            pc = p.transform.apply_coords_torch(
                torch.as_tensor(coords, dtype=torch.float32, device=self.device), size)
            pl = torch.as_tensor(labels, dtype=torch.int64, device=self.device)
        if boxes is not None:
            bx = p.transform.apply_boxes_torch(
                torch.as_tensor(boxes, dtype=torch.float32, device=self.device), size)
        masks, iou_pred, low_res = p.predict_torch(pc, pl, bx, multimask_output=multimask,
                                                   mask_input=mask_input)
        return masks.cpu().numpy(), iou_pred.float().cpu().numpy(), low_res

    # ------------------------------------------------------------------ protocols
    def _gt_prompts(self, img_pos: int, img: Dict[str, Any], counts: Dict[str, int]
                    ) -> Iterator[Dict[str, Any]]:
        """One prompt per usable annotation, lazily: only a batch of GT masks is in memory
        (LVIS images can have hundreds of annotations)."""
        h, w = img["height"], img["width"]
        for ann in self.dataset.anns_by_image.get(img["id"], []):
            if ann.get("iscrowd", 0):
                counts["skipped_crowd"] += 1
                continue
            mask = ann_to_mask(ann, h, w) if _has_geometry(ann) else None
            if mask is None or not mask.any():
                counts["skipped_empty"] += 1
                continue
            item = {"key": (img_pos, ann["id"]), "ann": ann, "gt": mask}
            if self.cfg.prompt == "point":
                item["points"] = object_points(mask, self.cfg.num_points, self.cfg.seed,
                                               ann["id"], self.cfg.point_from)
                item["labels"] = np.ones(self.cfg.num_points, dtype=np.int64)
            else:
                item["box"] = xywh_to_xyxy(ann["bbox"] if "bbox" in ann else _mask_box(mask))
            yield item

    def _run_gt_batch(self, batch: Sequence[Dict[str, Any]], out: Dict[str, List]) -> None:
        cfg = self.cfg
        gt = np.stack([it["gt"] for it in batch])  # (B, H, W)
        if cfg.prompt == "point":
            coords = np.stack([it["points"] for it in batch])
            labels = np.stack([it["labels"] for it in batch])
            boxes = None
        else:
            coords = labels = None
            boxes = np.stack([it["box"] for it in batch])
        multimask = cfg.prompt == "point" and cfg.num_points == 1
        masks, iou_pred, low_res = self._decode(coords, labels, boxes, multimask)
        ious = batch_mask_iou(masks, gt[:, None])  # (B, C)
        pick = ious.argmax(1) if cfg.oracle else iou_pred.argmax(1)
        rows = np.arange(len(batch))
        chosen = masks[rows, pick]
        first_iou = ious[rows, pick]
        click_ious: List[np.ndarray] = []
        if cfg.num_clicks:
            cur_mask, cur_logits = chosen, low_res[torch.as_tensor(rows), torch.as_tensor(pick)]
            cc = coords if coords is not None else np.zeros((len(batch), 0, 2))
            cl = labels if labels is not None else np.zeros((len(batch), 0), dtype=np.int64)
            for _ in range(cfg.num_clicks):
                clicks = [correction_click(cur_mask[i], gt[i]) for i in rows]
                cc = np.concatenate([cc, np.stack([c[0] for c in clicks])[:, None]], 1)
                cl = np.concatenate([cl, np.array([[c[1]] for c in clicks])], 1)
                m, _, lr = self._decode(cc, cl, boxes, False, cur_logits[:, None])
                cur_mask, cur_logits = m[:, 0], lr[:, 0]
                click_ious.append(batch_mask_iou(cur_mask, gt))
        for i, it in enumerate(batch):
            ann = it["ann"]
            rec = {"key": it["key"], "image_id": ann["image_id"], "ann_id": ann["id"],
                   "iou": float(first_iou[i]), "size": size_of(ann.get("area", it["gt"].sum())),
                   "predicted_iou": float(iou_pred[i, pick[i]])}
            if click_ious:
                rec["click_ious"] = [float(c[i]) for c in click_ious]
            out["records"].append(rec)
            if cfg.save_predictions:
                prompt = ({"point_coords": it["points"].tolist(),
                           "point_labels": it["labels"].tolist()}
                          if "points" in it else {"box_xyxy": it["box"].tolist()})
                out["predictions"].append({
                    "key": it["key"], "image_id": ann["image_id"], "ann_id": ann["id"],
                    "category_id": ann["category_id"], "prompt": prompt,
                    "multimask_index": int(pick[i]) if multimask else None,
                    "segmentation": mask_to_rle(chosen[i]), "iou": rec["iou"],
                    "predicted_iou": rec["predicted_iou"]})

    def _run_detector(self, img_pos: int, img: Dict[str, Any], out: Dict[str, List]) -> None:
        dets = self.detections.get(img["id"], [])
        if self.cfg.max_dets is not None:
            dets = dets[: self.cfg.max_dets]  # already sorted by descending score
        for batch in _chunks(enumerate(dets), self.cfg.batch_prompts):
            boxes = np.stack([xywh_to_xyxy(d["bbox"]) for _, d in batch])
            masks, iou_pred, _ = self._decode(None, None, boxes, False)
            for (j, d), m, s in zip(batch, masks[:, 0], iou_pred[:, 0]):
                res = {"key": (img_pos, j), "image_id": img["id"],
                       "category_id": d["category_id"], "segmentation": mask_to_rle(m),
                       "score": float(d["score"]), "bbox": [float(v) for v in d["bbox"]],
                       "predicted_iou": float(s)}
                out["results"].append(res)

    # ------------------------------------------------------------------ loop
    def run(self, images: Sequence[Tuple[int, Dict[str, Any], str]],
            missing: Sequence[int] = (), progress: bool = False) -> Dict[str, Any]:
        """Evaluate ``(position, image, path)`` triples (see ``locate_images``); returns a
        picklable shard result."""
        out: Dict[str, Any] = {"records": [], "results": [], "predictions": [],
                               "evaluated_image_ids": [], "missing_images": list(missing)}
        counts = {"skipped_crowd": 0, "skipped_empty": 0}
        seconds = 0.0
        it = images
        if progress:
            from tqdm import tqdm

            it = tqdm(images, desc=f"{self.cfg.prompt} eval", unit="img", dynamic_ncols=True)
        for img_pos, img, path in it:
            pixels = read_image(path)
            if pixels.shape[:2] != (img["height"], img["width"]):
                raise DatasetError(
                    f"image {path!r} is {pixels.shape[1]}x{pixels.shape[0]}, but the annotation "
                    f"file says {img['width']}x{img['height']}")
            t0 = time.perf_counter()
            self.predictor.set_image(pixels)
            if self.cfg.prompt == "detector":
                self._run_detector(img_pos, img, out)
            else:
                for batch in _chunks(self._gt_prompts(img_pos, img, counts),
                                     self.cfg.batch_prompts):
                    self._run_gt_batch(batch, out)
            seconds += time.perf_counter() - t0
            out["evaluated_image_ids"].append(img["id"])
        out["counts"] = counts
        out["seconds"] = seconds
        return out


def locate_images(
    img_dir: str, images: Sequence[Tuple[int, Dict[str, Any]]], skip_missing: bool
) -> Tuple[List[Tuple[int, Dict[str, Any], str]], List[int]]:
    """Find every image file before any model is built, so a wrong ``--img-dir`` fails in a
    second, not after hours. Returns (position, image, path) triples and missing image ids."""
    found, missing = [], []
    for pos, img in images:
        path = resolve_image_path(img_dir, img)
        if path is None:
            missing.append(img)
        else:
            found.append((pos, img, path))
    if missing and not skip_missing:
        eg = ", ".join(f"{m['id']} ({m.get('file_name') or m.get('coco_url')})"
                       for m in missing[:3])
        raise DatasetError(
            f"{len(missing)} image(s) not found in {img_dir!r} (nor in its train2017/ or "
            f"val2017/ subfolders), e.g. {eg}; pass --skip-missing-images to skip and count them")
    return found, [m["id"] for m in missing]


def _mask_box(mask: np.ndarray) -> List[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
            float(ys.max() - ys.min() + 1)]


def merge_shards(shards: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Concatenate per-rank results in the order one process would have produced them."""
    merged: Dict[str, Any] = {}
    for key in ("records", "results", "predictions"):
        merged[key] = sorted((x for s in shards for x in s[key]), key=lambda x: x["key"])
    for key in ("evaluated_image_ids", "missing_images"):
        merged[key] = sorted(i for s in shards for i in s[key])
    merged["counts"] = {k: sum(s["counts"][k] for s in shards) for k in shards[0]["counts"]}
    merged["seconds_per_rank"] = [s["seconds"] for s in shards]
    return merged


def compute_metrics(merged: Dict[str, Any], dataset: EvalDataset, cfg: ProtocolConfig
                    ) -> Dict[str, Any]:
    """mIoU (point/box) or mask AP (detector; COCOeval or LVISEval by dataset kind) over the
    evaluated images only (so ``--limit`` and skipped images do not count as misses)."""
    if cfg.prompt != "detector":
        metrics = summarize_miou(merged["records"])
        for c in range(cfg.num_clicks):
            recs = [{"iou": r["click_ious"][c], "size": r["size"]} for r in merged["records"]]
            metrics[f"mIoU_click{c + 2}"] = summarize_miou(recs)["mIoU"]
        return metrics
    img_ids = merged["evaluated_image_ids"]
    if dataset.kind == "lvis":
        metrics = lvis_segm_eval(dataset.raw, merged["results"], img_ids, cfg.max_dets or 300)
    else:
        metrics = coco_segm_eval(dataset.raw, merged["results"], img_ids)
    metrics["num_masks"] = len(merged["results"])
    return metrics
