"""Tiny COCO / LVIS evaluation sets written from scikit-image photos (test fixtures only).

Kept out of ``blsam.evaluation``: the library reads datasets, it does not invent them.
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils

from blsam.evaluation.datasets import ann_to_mask, ann_to_rle, mask_to_rle, resolve_image_path
from blsam.evaluation.prompts import object_points, xywh_to_xyxy


def _photos(size: int) -> list[np.ndarray]:
    import cv2
    from skimage import data

    out = []
    for fn in (data.astronaut, data.coffee, data.chelsea):
        img = fn()
        out.append(np.ascontiguousarray(cv2.resize(img, (size, size),
                                                   interpolation=cv2.INTER_AREA)))
    return out


def _ellipse_poly(cx: float, cy: float, ax: float, ay: float, n: int = 24) -> list[float]:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    pts = np.stack([cx + ax * np.cos(t), cy + ay * np.sin(t)], 1)
    return [round(float(v), 2) for v in pts.reshape(-1)]


def make_tiny_dataset(
    out_dir: str, kind: str = "coco", size: int = 128, num_images: int = 3,
    with_detections: bool = True,
) -> dict[str, str]:
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
        im: dict[str, Any] = {"id": img_id, "height": size, "width": size}
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


class GTPredictor:
    """Stands in for ``SamPredictor``: answers each prompt with the GT mask it was made from
    (matched by undoing SAM's resize transform), so the runner's whole path can be checked
    against perfect and empty predictions. ``rank_empty_first``: with multimask output the
    empty mask gets the highest predicted IoU (only ``--oracle`` then finds the GT mask)."""

    def __init__(self, ds, paths, cfg, empty=False, rank_empty_first=False, img_size=64):
        from segment_anything.utils.transforms import ResizeLongestSide

        from blsam.evaluation.datasets import read_image

        self.transform = ResizeLongestSide(img_size)
        self.device = torch.device("cpu")
        self.cfg, self.empty, self.rank_empty_first = cfg, empty, rank_empty_first
        self.by_pixels = {}
        for img in ds.images:
            px = read_image(resolve_image_path(paths["img_dir"], img))
            self.by_pixels[px.tobytes()] = (img, ds.anns_by_image.get(img["id"], []))

    encoded = 0  # set_image calls: the encoder passes a real predictor would make
    multimask_calls: list[bool] = []

    def set_image(self, pixels):
        self.encoded += 1
        self.img, anns = self.by_pixels[pixels.tobytes()]
        self.original_size = pixels.shape[:2]
        h, w = self.original_size
        self.gt = [(a, ann_to_mask(a, h, w)) for a in anns
                   if not a.get("iscrowd", 0) and a["area"] > 0]

    def _unscale(self, xy):
        from segment_anything.utils.transforms import ResizeLongestSide

        h, w = self.original_size
        nh, nw = ResizeLongestSide.get_preprocess_shape(h, w, self.transform.target_length)
        return xy.numpy() / np.array([nw / w, nh / h])

    def _match(self, points, box):
        for ann, m in self.gt:
            if box is not None and np.allclose(box.reshape(2, 2), xywh_to_xyxy(ann["bbox"])
                                               .reshape(2, 2), atol=1e-3):
                return m
            if points is not None:
                want = object_points(m, len(points), self.cfg.seed, ann["id"],
                                     self.cfg.point_from)
                if np.allclose(points, want, atol=1e-3):
                    return m
        raise AssertionError(f"prompt matches no GT annotation: {points} {box}")

    def predict_torch(self, pc, pl, bx, multimask_output=True, mask_input=None):
        self.multimask_calls = self.multimask_calls + [bool(multimask_output)]
        n = len(pc) if pc is not None else len(bx)
        masks = []
        for i in range(n):
            m = self._match(None if pc is None else self._unscale(pc[i]),
                            None if bx is None else self._unscale(bx[i].reshape(2, 2)))
            masks.append(np.zeros_like(m) if self.empty else m)
        masks = torch.as_tensor(np.stack(masks))[:, None]
        iou = torch.ones(n, 1)
        if multimask_output:
            z = torch.zeros_like(masks)
            masks = torch.cat([z, masks, z], 1)
            iou = torch.tensor([[0.9, 0.5, 0.1] if self.rank_empty_first else [0.1, 0.9, 0.5]]
                               ).repeat(n, 1)
        return masks, iou, torch.zeros(n, masks.shape[1], 16, 16)


def with_wrong_size_image(d: dict[str, Any], image_id: int, out_dir: str, width: int
                          ) -> dict[str, Any]:
    """A copy of a COCO fixture whose image ``image_id`` is stored ``width`` pixels wide while
    the (still consistent) annotation file keeps its size: an error only the image's reader
    sees, on the rank that reads it."""
    import shutil

    import cv2

    img_dir = os.path.join(out_dir, "images")
    shutil.copytree(d["img_dir"], img_dir)
    ann = json.load(open(d["ann_file"]))
    name = next(im["file_name"] for im in ann["images"] if im["id"] == image_id)
    path = os.path.join(img_dir, name)
    img = cv2.imread(path)
    cv2.imwrite(path, cv2.resize(img, (width, img.shape[0])))
    return dict(d, img_dir=img_dir)
