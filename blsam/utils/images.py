"""Image loading shared by the command-line tools."""
from __future__ import annotations

import os
from typing import Optional

import numpy as np


def load_rgb_image(path: Optional[str | os.PathLike]) -> np.ndarray:
    """An RGB uint8 (H, W, 3) image from ``path``; the bundled astronaut photo when None."""
    if path is None:
        from blsam.testing import real_photo

        return real_photo()
    import cv2

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image not found: {path}")
    bgr = cv2.imread(path, cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"cannot decode image {path!r} (not an image, or corrupt)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
