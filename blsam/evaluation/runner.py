"""The per-image loop: encode each image once, decode every protocol's prompts in batches.

Why one loop for several protocols: the image encoder is the expensive part (and the part the
paper changes); the decoder is cheap. One ``set_image`` per image serves every protocol of the
run (1 point, 3 points, box, detector), so LVIS val's ~20k images are encoded once instead of
once per protocol, and an image with nothing to prompt is not encoded (nor read) at all.

Every output item carries a sort key (image position, prompt index) so that the shards of a
torchrun job merge into exactly the list one process would produce.
"""
from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from segment_anything import SamPredictor

from ..modeling.prompt_inputs import prompt_inputs
from ..prompts import mask_box
from ..utils.dist import synchronize
from .datasets import (
    DatasetError,
    EvalDataset,
    ann_to_rle,
    check_image_file,
    has_geometry,
    mask_to_rle,
    read_image_oriented,
    resolve_image_path,
    size_problem,
)
from .metrics import batch_mask_iou, coco_segm_eval, lvis_segm_eval, size_of, summarize_miou
from .prompts import (
    correction_click,
    farthest_from_boundary,
    iterative_click,
    object_points,
    xywh_to_xyxy,
)
from .protocol import POINT_MODES, PROMPTS, ProtocolConfig  # noqa: F401  (re-exported)
from .results import ImageCounts, ProtocolOutput, ShardResult


def _chunks(items: Iterable[Any], n: int) -> Iterator[list[Any]]:
    it = iter(items)
    while True:
        chunk = list(itertools.islice(it, n))
        if not chunk:
            return
        yield chunk


class Predictor(SamPredictor):
    """``SamPredictor`` whose prompt encoder and dense PE run in fp32 under autocast
    (``--amp bf16``) and without a host sync: ``modeling.prompt_inputs``, the function training
    and validation use. Outside autocast its results are ``SamPredictor``'s, bit for bit."""

    def predict_torch(self, point_coords: torch.Tensor | None,
                      point_labels: torch.Tensor | None, boxes: torch.Tensor | None = None,
                      mask_input: torch.Tensor | None = None, multimask_output: bool = True,
                      return_logits: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")
        model = self.model
        points = None if point_coords is None else (point_coords, point_labels)
        sparse, dense, image_pe = prompt_inputs(model.prompt_encoder, points, boxes, mask_input)
        low_res, iou_pred = model.mask_decoder(
            image_embeddings=self.features, image_pe=image_pe, sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense, multimask_output=multimask_output)
        masks = model.postprocess_masks(low_res, self.input_size, self.original_size)
        if not return_logits:
            masks = masks > model.mask_threshold
        return masks, iou_pred, low_res


class Evaluator:
    """Runs one or several protocols over a list of images with a ``SamPredictor``."""

    def __init__(self, predictor: Any, dataset: EvalDataset, img_dir: str,
                 cfg: ProtocolConfig | Sequence[ProtocolConfig],
                 detections: dict[int, list[dict[str, Any]]] | None = None,
                 skip_bad_images: bool = False, exif: str = "ignore") -> None:
        self.protocols = [cfg] if isinstance(cfg, ProtocolConfig) else list(cfg)
        if not self.protocols:
            raise ValueError("no protocol to evaluate")
        for c in self.protocols:
            c.validate()
        names = [c.name for c in self.protocols]
        if len(set(names)) != len(names):
            raise ValueError(f"each protocol once per run, got {names}")
        self.gt_protocols = [c for c in self.protocols if c.prompt != "detector"]
        self.det_protocol = next((c for c in self.protocols if c.prompt == "detector"), None)
        if self.det_protocol is not None and detections is None:
            raise ValueError("the detector protocol needs detections (--det-file)")
        self.predictor = predictor
        self.dataset = dataset
        self.img_dir = img_dir
        self.cfg = self.protocols[0]
        self.batch_prompts = self.protocols[0].batch_prompts
        self.detections = detections or {}
        self.skip_bad_images = skip_bad_images
        self.exif = exif
        self.device = predictor.device

    # ------------------------------------------------------------------ decoding
    def _decode(self, coords: np.ndarray | None, labels: np.ndarray | None,
                boxes: np.ndarray | None, multimask: bool,
                mask_input: torch.Tensor | None = None
                ) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
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

    @staticmethod
    def _pick(cfg: ProtocolConfig, masks: np.ndarray, iou_pred: np.ndarray, gt: np.ndarray | None
              ) -> tuple[np.ndarray, np.ndarray]:
        """Index of the kept mask per prompt (best predicted IoU, or best IoU to GT with
        --oracle) and the IoUs of every output to GT (None without GT)."""
        ious = batch_mask_iou(masks, gt[:, None]) if gt is not None else None
        pick = ious.argmax(1) if cfg.oracle else iou_pred.argmax(1)
        return pick, ious

    # ------------------------------------------------------------------ GT protocols
    def _usable_annotations(self, img: dict[str, Any], counts: ImageCounts
                            ) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """(annotation, RLE) of every annotation that can be prompted; crowd and empty ones are
        counted, not prompted, as are those the loader skipped (bad or empty). RLE areas are
        read without decoding the masks."""
        h, w = img["height"], img["width"]
        out = []
        skipped = self.dataset.skipped_by_image.get(img["id"], {})
        counts.bad_annotations += skipped.get("bad", 0)
        counts.skipped_empty += skipped.get("empty", 0)
        for ann in self.dataset.anns_by_image.get(img["id"], []):
            if ann["iscrowd"]:
                counts.skipped_crowd += 1
                continue
            rle = ann_to_rle(ann["segmentation"], h, w) if has_geometry(ann) else None
            if rle is None or mask_utils.area(rle) == 0:
                counts.skipped_empty += 1
                continue
            out.append((ann, rle))
        return out

    def _point_prompts(self, cfg: ProtocolConfig, anns: Sequence[dict[str, Any]],
                       gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        coords = np.stack([object_points(m, cfg.num_points, cfg.seed, a["id"], cfg.point_from)
                           for a, m in zip(anns, gt)])
        return coords, np.ones(coords.shape[:2], dtype=np.int64)

    def _iterative(self, cfg: ProtocolConfig, gt: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                              list[np.ndarray]]:
        """EfficientViT-SAM's iterative clicking: the GT center first, then ``iterative_click``
        (its Clicker's rules) on the mask kept at the previous step; multimask output and one
        mask kept at every step, no mask feedback. Every object is clicked and decoded at every
        step, as in the reference, even when its mask has no error left."""
        n = len(gt)
        rows = np.arange(n)
        clicked = np.zeros_like(gt)
        coords = np.stack([farthest_from_boundary(g)[0] for g in gt])[:, None]  # (B, 1, 2)
        labels = np.ones((n, 1), dtype=np.int64)
        chosen = pick = score = None
        step_ious: list[np.ndarray] = []
        for step in range(cfg.num_points):
            if step:
                clicks = [iterative_click(chosen[i], gt[i], clicked[i]) for i in rows]
                coords = np.concatenate([coords, np.stack([c[0] for c in clicks])[:, None]], 1)
                labels = np.concatenate([labels, np.array([[c[1]] for c in clicks])], 1)
            x, y = coords[:, -1, 0].astype(int), coords[:, -1, 1].astype(int)
            clicked[rows, y, x] = True
            masks, iou_pred, _ = self._decode(coords, labels, None, True)
            p, ious = self._pick(cfg, masks, iou_pred, gt)
            chosen, pick, score = masks[rows, p], p, iou_pred[rows, p]
            step_ious.append(batch_mask_iou(chosen, gt))
        return coords, labels, chosen, pick, score, step_ious

    def _run_gt_batch(self, cfg: ProtocolConfig, items: Sequence[tuple[Any, ...]],
                      gt: np.ndarray, out: ProtocolOutput) -> None:
        anns = [it[1] for it in items]
        rows = np.arange(len(items))
        coords = labels = boxes = None
        step_ious: list[np.ndarray] = []
        if cfg.prompt == "point" and cfg.point_from == "iterative":
            coords, labels, chosen, pick, score, step_ious = self._iterative(cfg, gt)
            first_iou = step_ious[-1]
            low_res = None
        else:
            if cfg.prompt == "point":
                coords, labels = self._point_prompts(cfg, anns, gt)
            else:
                boxes = np.stack([xywh_to_xyxy(a["bbox"]) if "bbox" in a else mask_box(m)
                                  for a, m in zip(anns, gt)]).astype(np.float64)
            masks, iou_pred, low_res = self._decode(coords, labels, boxes, cfg.multimask)
            pick, ious = self._pick(cfg, masks, iou_pred, gt)
            chosen, score, first_iou = masks[rows, pick], iou_pred[rows, pick], ious[rows, pick]
        click_ious: list[np.ndarray] = []
        if cfg.num_clicks:
            cur_mask, cur_logits = chosen, low_res[torch.as_tensor(rows), torch.as_tensor(pick)]
            cc = coords if coords is not None else np.zeros((len(items), 0, 2))
            cl = labels if labels is not None else np.zeros((len(items), 0), dtype=np.int64)
            for _ in range(cfg.num_clicks):
                clicks = [correction_click(cur_mask[i], gt[i]) for i in rows]
                cc = np.concatenate([cc, np.stack([c[0] for c in clicks])[:, None]], 1)
                cl = np.concatenate([cl, np.array([[c[1]] for c in clicks])], 1)
                m, _, lr = self._decode(cc, cl, boxes, False, cur_logits[:, None])
                cur_mask, cur_logits = m[:, 0], lr[:, 0]
                click_ious.append(batch_mask_iou(cur_mask, gt))
        for i, (key, ann, _) in enumerate(items):
            rec = {"key": key, "image_id": ann["image_id"], "ann_id": ann["id"],
                   "iou": float(first_iou[i]), "size": size_of(ann.get("area", gt[i].sum())),
                   "predicted_iou": float(score[i])}
            if click_ious:
                rec["click_ious"] = [float(c[i]) for c in click_ious]
            if len(step_ious) > 1:
                rec["step_ious"] = [float(c[i]) for c in step_ious]
            out.records.append(rec)
            if cfg.save_predictions:
                prompt = ({"point_coords": coords[i].tolist(), "point_labels": labels[i].tolist()}
                          if coords is not None else {"box_xyxy": boxes[i].tolist()})
                out.predictions.append({
                    "key": key, "image_id": ann["image_id"], "ann_id": ann["id"],
                    "category_id": ann["category_id"], "prompt": prompt,
                    "multimask_index": int(pick[i]) if cfg.multimask else None,
                    "segmentation": mask_to_rle(chosen[i]), "iou": rec["iou"],
                    "predicted_iou": rec["predicted_iou"]})

    # ------------------------------------------------------------------ detector
    def _image_detections(self, img: dict[str, Any]) -> list[dict[str, Any]]:
        if self.det_protocol is None:
            return []
        dets = self.detections.get(img["id"], [])
        if self.det_protocol.max_dets is not None:
            dets = dets[: self.det_protocol.max_dets]  # already sorted by descending score
        return dets

    def _run_detector(self, img_pos: int, img: dict[str, Any], dets: list[dict[str, Any]],
                      out: ProtocolOutput) -> None:
        cfg = self.det_protocol
        for batch in _chunks(enumerate(dets), self.batch_prompts):
            boxes = np.stack([xywh_to_xyxy(d["bbox"]) for _, d in batch])
            masks, iou_pred, _ = self._decode(None, None, boxes, cfg.multimask)
            pick, _ = self._pick(cfg, masks, iou_pred, None)
            rows = np.arange(len(batch))
            for (j, d), m, s in zip(batch, masks[rows, pick], iou_pred[rows, pick]):
                out.results.append({
                    "key": (img_pos, j), "image_id": img["id"], "category_id": d["category_id"],
                    "segmentation": mask_to_rle(m), "score": float(d["score"]),
                    "bbox": [float(v) for v in d["bbox"]], "predicted_iou": float(s)})

    # ------------------------------------------------------------------ loop
    def run(self, images: Sequence[tuple[int, dict[str, Any], str]],
            missing: Sequence[int] = (), progress: bool = False,
            bad: Sequence[dict[str, Any]] = (),
            should_stop: Callable[[], None] | None = None) -> ShardResult:
        """Evaluate ``(position, image, path)`` triples (see ``locate_images``); returns a
        picklable ``ShardResult`` with one ``ProtocolOutput`` per protocol. ``should_stop`` is
        called before each image and may raise to end the loop (another rank of a torchrun job
        failed)."""
        out = ShardResult({c.name: ProtocolOutput() for c in self.protocols},
                          missing_images=list(missing), bad_images=list(bad))
        counts = out.counts
        it = images
        if progress:
            from tqdm import tqdm

            names = "+".join(c.name for c in self.protocols)
            it = tqdm(images, desc=f"{names} eval", unit="img", dynamic_ncols=True)
        for img_pos, img, path in it:
            if should_stop is not None:
                should_stop()
            usable = self._usable_annotations(img, counts) if self.gt_protocols else []
            dets = self._image_detections(img)
            if not usable and not dets:  # nothing to prompt: no pixels needed
                counts.images_not_encoded += 1
                out.evaluated_image_ids.append(img["id"])
                continue
            try:
                pixels, orientation = read_image_oriented(path, img["height"], img["width"],
                                                          self.exif)
            except DatasetError as e:
                if not self.skip_bad_images:
                    raise
                out.bad_images.append({"id": img["id"], "file": path, "reason": str(e)})
                continue
            counts.exif_rotated_images += orientation != 1  # its tag would turn it
            synchronize(self.device)
            t0 = time.perf_counter()
            self.predictor.set_image(pixels)
            synchronize(self.device)
            out.encoder_s += time.perf_counter() - t0
            counts.images_encoded += 1
            items = [((img_pos, a["id"]), a, rle) for a, rle in usable]
            for batch in _chunks(items, self.batch_prompts):
                gt = np.stack([mask_utils.decode(rle).astype(bool) for _, _, rle in batch])
                for cfg in self.gt_protocols:
                    t0 = time.perf_counter()
                    self._run_gt_batch(cfg, batch, gt, out.protocols[cfg.name])
                    out.protocols[cfg.name].decode_s += time.perf_counter() - t0
            if dets:
                t0 = time.perf_counter()
                det_out = out.protocols[self.det_protocol.name]
                self._run_detector(img_pos, img, dets, det_out)
                det_out.decode_s += time.perf_counter() - t0
            out.evaluated_image_ids.append(img["id"])
        return out


def locate_images(
    img_dir: str, images: Sequence[tuple[int, dict[str, Any]]], skip_missing: bool,
    skip_bad: bool = False,
) -> tuple[list[tuple[int, dict[str, Any], str]], list[int], list[dict[str, Any]]]:
    """Find every image file and check it is whole (``check_image_file``: a truncated JPEG
    decodes without error) before any model is built, so a wrong ``--img-dir`` or a half-copied
    dataset fails in seconds, not after hours. Returns (position, image, path) triples, missing
    image ids, and the bad images skipped (``{"id", "file", "reason"}``)."""
    found, missing, bad = [], [], []
    for pos, img in images:
        path = resolve_image_path(img_dir, img)
        if path is None:
            missing.append(img)
            continue
        problem = size_problem(img["height"], img["width"]) or check_image_file(path)
        if problem is None:
            found.append((pos, img, path))
        elif skip_bad:
            bad.append({"id": img["id"], "file": path, "reason": problem})
        else:
            raise DatasetError(f"image {img['id']} ({path!r}): {problem}; pass "
                               f"--skip-bad-images to skip and count such images")
    if missing and not skip_missing:
        eg = ", ".join(f"{m['id']} ({m.get('file_name') or m.get('coco_url')})"
                       for m in missing[:3])
        raise DatasetError(
            f"{len(missing)} image(s) not found in {img_dir!r} (nor in its train2017/ or "
            f"val2017/ subfolders), e.g. {eg}; pass --skip-missing-images to skip and count them")
    return found, [m["id"] for m in missing], bad


def compute_metrics(merged: ShardResult, dataset: EvalDataset, cfg: ProtocolConfig
                    ) -> dict[str, Any]:
    """mIoU (point/box) or mask AP (detector; COCOeval or LVISEval by dataset kind) over the
    evaluated images only (so ``--limit`` and skipped images do not count as misses)."""
    part = merged.protocols[cfg.name]
    if cfg.prompt != "detector":
        metrics = summarize_miou(part.records)
        for c in range(cfg.num_clicks):
            recs = [{"iou": r["click_ious"][c], "size": r["size"]} for r in part.records]
            metrics[f"mIoU_click{c + 2}"] = summarize_miou(recs)["mIoU"]
        if cfg.prompt == "point" and cfg.point_from == "iterative":
            for j in range(1, cfg.num_points):  # mIoU after each earlier click
                recs = [{"iou": r.get("step_ious", [r["iou"]])[j - 1], "size": r["size"]}
                        for r in part.records]
                metrics[f"mIoU_point{j}"] = summarize_miou(recs)["mIoU"]
        return metrics
    img_ids = merged.evaluated_image_ids
    if dataset.kind == "lvis":
        metrics = lvis_segm_eval(dataset.raw, part.results, img_ids, cfg.max_dets or 300)
    else:
        metrics = coco_segm_eval(dataset.raw, part.results, img_ids)
    metrics["num_masks"] = len(part.results)
    return metrics
