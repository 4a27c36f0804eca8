"""Prompts from ground-truth masks shared by training and evaluation.

Why one module: a training click and an evaluation click must be the same pixel for the same
mask and RNG (SAM's convention: integer pixel indices x, y; its prompt encoder adds the half
pixel), and a box is the mask's tight box in both.
"""
from __future__ import annotations

import numpy as np


def mask_box(mask: np.ndarray) -> np.ndarray:
    """Tight XYXY box of a binary mask (x1, y1 exclusive, i.e. pixel edges); zeros if empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return np.zeros(4, np.float32)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def sample_points(mask: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """``k`` foreground pixels drawn uniformly without replacement (with replacement when the
    mask has fewer than ``k`` pixels), as float (k, 2) x, y pixel coordinates (SAM's convention:
    integer pixel indices; its prompt encoder adds the half-pixel shift)."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        raise ValueError("cannot sample points from an empty mask")
    idx = rng.choice(len(xs), size=k, replace=len(xs) < k)
    return np.stack([xs[idx], ys[idx]], axis=1).astype(np.float64)


def farthest_from_boundary(region: np.ndarray) -> tuple[np.ndarray, float]:
    """The pixel of ``region`` farthest from its boundary (image border counts as boundary),
    as (x, y), and that distance. SAM's "center" click and its correction-click rule."""
    import cv2

    padded = np.pad(region.astype(np.uint8), 1)
    dist = cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]
    flat = int(np.argmax(dist))  # first maximum in raster order: deterministic
    y, x = divmod(flat, region.shape[1])
    return np.array([x, y], dtype=np.float64), float(dist[y, x])


def center_point(mask: np.ndarray) -> np.ndarray:
    """(1, 2) x, y: the mask pixel farthest from the mask boundary."""
    if not mask.any():
        raise ValueError("cannot find the center of an empty mask")
    return farthest_from_boundary(mask)[0][None]
