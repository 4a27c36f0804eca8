"""Prompt sampling from ground-truth masks, as SAM's training does (SAM paper, App. A).

Boxes: the mask's tight box with Gaussian noise of std 10% of the box side per coordinate,
clipped to 20 px at 1024 px (scaled with the image size, so tiny test images see the same
relative noise). Points: uniform samples inside the mask, all foreground, as integer pixel
indices (x, y) -- SAM's convention, the one evaluation uses: SAM's prompt encoder adds the
half-pixel shift itself, so adding 0.5 here would put every training click half a pixel off
the evaluation clicks.
All sampling takes an explicit ``numpy.random.Generator`` so a resumed run draws the same prompts.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..prompts import mask_box, sample_points  # noqa: F401  (the samplers evaluation uses)

PROMPT_TYPES = ("box", "point", "points")  # point: one click, multimask; points: 2..max clicks


def noisy_box(
    mask: np.ndarray, rng: np.random.Generator, img_size: int, noise: float = 0.1,
    max_noise_px: float = 20.0,
) -> np.ndarray:
    """SAM-style jittered box: std ``noise`` x side, each offset clipped to ``max_noise_px``
    (given at 1024 px), clipped to the image."""
    box = mask_box(mask)
    w, h = box[2] - box[0], box[3] - box[1]
    std = noise * np.array([w, h, w, h], np.float32)
    cap = max_noise_px * img_size / 1024.0
    jitter = np.clip(rng.normal(size=4).astype(np.float32) * std, -cap, cap)
    out = box + jitter
    out[[0, 2]] = np.clip(out[[0, 2]], 0, mask.shape[1])
    out[[1, 3]] = np.clip(out[[1, 3]], 0, mask.shape[0])
    x0, x1 = sorted(out[[0, 2]])
    y0, y1 = sorted(out[[1, 3]])
    return np.array([x0, y0, x1, y1], np.float32)


def choose_prompt(rng: np.random.Generator, types: Sequence[str], max_points: int
                  ) -> tuple[str, int]:
    """One prompt kind per image (all its masks share it, so they batch in the decoder)."""
    kind = types[int(rng.integers(len(types)))]
    if kind == "box":
        return kind, 0
    if kind == "point":
        return kind, 1
    return kind, int(rng.integers(2, max(2, max_points) + 1))
