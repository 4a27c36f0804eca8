"""The one image reader of training, evaluation and the command-line tools (PIL).

Why one reader: OpenCV's ``imread`` applies the EXIF orientation tag while PIL does not, so the
same file was read one way for training and the other way for evaluation. COCO, LVIS and SA-1B
annotations are drawn on the stored pixel array (the tag ignored, as EfficientViT-SAM's and
SAM's own readers do with PIL ``.convert("RGB")``): ``exif="ignore"`` is the default
everywhere; ``exif="apply"`` rotates / mirrors the pixels as a photo viewer shows them.
"""
from __future__ import annotations

import io
import os
from typing import Optional, Tuple, Union

import numpy as np

EXIF_MODES = ("ignore", "apply")
ORIENTATION_TAG = 0x0112  # EXIF Orientation: 1 = as stored, 2-8 = mirror and/or rotate
SWAPS_SIDES = (5, 6, 7, 8)  # orientations that exchange width and height


def decode_rgb(src: Union[str, "os.PathLike[str]", bytes], exif: str = "ignore"
               ) -> Tuple[np.ndarray, int]:
    """RGB uint8 (H, W, 3) from a file path or encoded bytes, and the file's EXIF orientation
    (1 when absent). PIL's strict loader: a truncated or corrupt file raises (``OSError`` /
    ``ValueError``). ``exif``: "ignore" (stored pixels) or "apply" (the tag's rotation)."""
    from PIL import Image, ImageOps

    if exif not in EXIF_MODES:
        raise ValueError(f"exif orientation must be one of {EXIF_MODES}, got {exif!r}")
    fp = io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else os.fspath(src)
    with Image.open(fp) as im:
        im.load()
        try:
            orientation = int(im.getexif().get(ORIENTATION_TAG, 1) or 1)
        except Exception:  # an unreadable EXIF block: treat as untagged
            orientation = 1
        if orientation not in range(1, 9):
            orientation = 1
        if exif == "apply" and orientation != 1:
            im = ImageOps.exif_transpose(im)
        return np.asarray(im.convert("RGB")).copy(), orientation


def load_rgb_image(path: Optional[Union[str, "os.PathLike[str]"]], exif: str = "ignore"
                   ) -> np.ndarray:
    """An RGB uint8 (H, W, 3) image from ``path``; the bundled astronaut photo when None."""
    if path is None:
        from blsam.testing import real_photo

        return real_photo()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image not found: {path}")
    try:
        return decode_rgb(path, exif)[0]
    except (OSError, SyntaxError) as e:  # PIL: UnidentifiedImageError is an OSError
        raise ValueError(f"cannot decode image {path!r} (not an image, or corrupt): {e}") from e
