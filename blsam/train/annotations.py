"""SA-1B annotations checked before they become targets, and the mask resizing of a sample.

The RLE must add up to height x width (an empty or short ``counts`` string would otherwise
decode to uninitialised memory), and the decoded area and box must agree with the JSON's
``area`` and ``bbox``. A bad annotation is skipped and counted by the dataset.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..segmentation import AnnotationError, check_rle

LOW_RES_FACTOR = 4  # SAM's decoder predicts masks at img_size / 4 (256 px at 1024)
MAX_MASK_FRACTION = 0.9  # SAM drops masks that cover more than 90% of the image
AREA_TOL, BOX_TOL_PX = 0.01, 2.0  # decoded vs JSON: 1% of the area (>= 2 px), 2 px + 1% of side


def check_annotation(ann: dict[str, Any], hw: tuple[int, int]) -> None:
    """Raise ``AnnotationError`` unless the RLE covers exactly h*w pixels and its area and box
    agree with the JSON's ``area`` and ``bbox`` (tolerances ``AREA_TOL``, ``BOX_TOL_PX``)."""
    from pycocotools import mask as mask_utils

    seg = ann["segmentation"]
    h, w = hw
    runs = check_rle(seg, h, w)
    area = int(runs[1::2].sum())
    if area == 0:
        raise AnnotationError("empty mask")
    if "area" in ann and abs(area - float(ann["area"])) > max(2.0, AREA_TOL * area):
        raise AnnotationError(f"decoded area {area} != json area {ann['area']}")
    if "bbox" in ann:
        rle = {"size": [h, w], "counts": seg["counts"].encode("ascii")
               if isinstance(seg["counts"], str) else seg["counts"]}
        if not isinstance(rle["counts"], bytes):
            rle = mask_utils.frPyObjects(rle, h, w)
        box = np.asarray(mask_utils.toBbox(rle), np.float64)
        tol = BOX_TOL_PX + 0.01 * max(h, w)
        if np.abs(box - np.asarray(ann["bbox"], np.float64)).max() > tol:
            raise AnnotationError(f"decoded box {box.tolist()} != json bbox {ann['bbox']}")


def decode_rle(segmentation: dict[str, Any]) -> np.ndarray:
    """COCO compressed RLE (SA-1B's ``counts`` string) -> (h, w) uint8 mask."""
    import warnings

    from pycocotools import mask as mask_utils

    rle = dict(segmentation)
    if isinstance(rle["counts"], str):
        rle["counts"] = rle["counts"].encode("ascii")
    with warnings.catch_warnings():  # pycocotools' numpy-2 copy= deprecation, not ours
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(rle)


def resize_mask(mask: np.ndarray, new_hw: tuple[int, int]) -> np.ndarray:
    """Binary mask resized like the image (bilinear, threshold 0.5): (h, w) -> new_hw bool."""
    import cv2

    m = cv2.resize(mask.astype(np.float32), (new_hw[1], new_hw[0]),
                   interpolation=cv2.INTER_LINEAR)
    return m >= 0.5


def downsample_mask(mask: np.ndarray, factor: int) -> np.ndarray:
    """Padded full-size bool mask -> low-res uint8 {0,1} target (area average >= 0.5). uint8
    until the loss (which takes ``.float()``): a quarter of the bytes through worker queues,
    pinned buffers and the host-to-device copy."""
    import cv2

    s = mask.shape[0] // factor
    m = cv2.resize(mask.astype(np.float32), (s, s), interpolation=cv2.INTER_AREA)
    return (m >= 0.5).astype(np.uint8)
