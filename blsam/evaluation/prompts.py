"""Prompt sampling for the point and box protocols, independent of the model.

Why seeded per annotation: every model (and every rank of a torchrun job, whatever its shard)
must click the very same pixels, so points come from an RNG seeded by (seed, annotation id),
never from a global stream whose state depends on what was evaluated before.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..prompts import center_point, farthest_from_boundary, sample_points  # noqa: F401


def annotation_rng(seed: int, ann_id: int) -> np.random.Generator:
    """The RNG for one annotation: same (seed, id) -> same points, in any process."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(ann_id) & 0xFFFFFFFFFFFF])


def nested_points(mask: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """``k`` distinct foreground pixels drawn one at a time, uniformly, so the first j of k
    points are the j points drawn for any k >= j ("nested": the 1-point click is the first of
    the 3). Repeats only when the mask has fewer than ``k`` pixels."""
    ys, xs = np.nonzero(mask)
    n = len(xs)
    if n == 0:
        raise ValueError("cannot sample points from an empty mask")
    picked: list = []
    while len(picked) < k:
        i = int(rng.integers(n))
        if i not in picked or n <= len(picked):
            picked.append(i)
    return np.stack([xs[picked], ys[picked]], axis=1).astype(np.float64)


def object_points(
    mask: np.ndarray, k: int, seed: int, ann_id: int, mode: str = "random"
) -> np.ndarray:
    """The protocol's k positive points for one annotation. ``mode``: "random" (paper: uniform
    inside the mask, drawn as one set), "nested" (uniform, drawn one by one: the first j are
    the same for every k) or "center" (first point at the center, the rest uniform). The
    "iterative" protocol places its later clicks from predictions: see ``iterative_click``."""
    rng = annotation_rng(seed, ann_id)
    if mode == "random":
        return sample_points(mask, k, rng)
    if mode == "nested":
        return nested_points(mask, k, rng)
    if mode == "center":
        first = center_point(mask)
        return first if k == 1 else np.concatenate([first, sample_points(mask, k - 1, rng)])
    raise ValueError(f"unknown point mode {mode!r}")


def _distance(region: np.ndarray) -> np.ndarray:
    """Exact L2 distance of each pixel of ``region`` to the nearest pixel outside it (the image
    border counts as outside), 0 outside ``region``."""
    import cv2

    padded = np.pad(region.astype(np.uint8), 1)
    return cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]


def iterative_click(pred: np.ndarray, gt: np.ndarray, clicked: np.ndarray
                    ) -> tuple[np.ndarray, int]:
    """The next click of the iterative protocol, by the rules of EfficientViT-SAM's (RITM's)
    ``Clicker``, so that every click is the reference's:

    1. the distance transform is taken over the *whole* missed-pixel region (``gt & ~pred``)
       and the whole false-positive region (``pred & ~gt``); pixels clicked before are zeroed
       *afterwards* (an earlier click does not push the next one away from it);
    2. the click is positive only when the deepest missed pixel is strictly deeper than the
       deepest false positive; a tie gives a negative click;
    3. the click goes to the first pixel in raster order with that depth; with no error pixel
       left (both depths 0) that is a negative click at the first raster position where the
       false-positive depth is 0 (usually (0, 0)): the object is clicked and decoded again,
       never frozen.

    Returns ((x, y), label)."""
    not_clicked = ~clicked.astype(bool)
    d_fn = _distance(gt & ~pred) * not_clicked
    d_fp = _distance(pred & ~gt) * not_clicked
    m_fn, m_fp = d_fn.max(), d_fp.max()
    positive = bool(m_fn > m_fp)
    depth, best = (d_fn, m_fn) if positive else (d_fp, m_fp)
    y, x = divmod(int(np.argmax(depth == best)), gt.shape[1])  # first in raster order
    return np.array([x, y], dtype=np.float64), int(positive)


def correction_click(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, int]:
    """Next interactive click: at the center of the largest error region (distance-transform
    maximum over false negatives and false positives); label 1 for a missed object pixel, 0 for
    a false positive. If the prediction is perfect, a positive click at the object center."""
    fn = gt & ~pred
    fp = pred & ~gt
    p_fn, d_fn = farthest_from_boundary(fn) if fn.any() else (None, -1.0)
    p_fp, d_fp = farthest_from_boundary(fp) if fp.any() else (None, -1.0)
    if p_fn is None and p_fp is None:
        return center_point(gt)[0], 1
    if d_fn >= d_fp:
        return p_fn, 1
    return p_fp, 0


def xywh_to_xyxy(box: Sequence[float]) -> np.ndarray:
    x, y, w, h = (float(v) for v in box)
    return np.array([x, y, x + w, y + h], dtype=np.float64)
