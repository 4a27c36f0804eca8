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
import warnings

import numpy as np
import torch

# SAM's pixel statistics (``Sam.pixel_mean`` / ``Sam.pixel_std``), RGB, 0-255
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
EXIF_MODES = ("ignore", "apply")
ORIENTATION_TAG = 0x0112  # EXIF Orientation: 1 = as stored, 2-8 = mirror and/or rotate
SWAPS_SIDES = (5, 6, 7, 8)  # orientations that exchange width and height


def pixel_limit() -> int | None:
    """The most pixels an image may have: PIL's ``Image.MAX_IMAGE_PIXELS`` (its decompression
    bomb guard, ~89 M by default; None: no limit), read when called so a user can raise it."""
    from PIL import Image

    return Image.MAX_IMAGE_PIXELS


def check_pixels(width: int, height: int, what: str) -> None:
    """``ValueError`` when a ``width`` x ``height`` image is over ``pixel_limit()``: said
    before anything is decoded, not a ``DecompressionBombError`` traceback (or gigabytes)."""
    limit = pixel_limit()
    if limit is not None and width * height > limit:
        raise ValueError(f"{what} is {width}x{height} = {width * height} pixels, more than "
                         f"the {limit}-pixel limit (PIL's Image.MAX_IMAGE_PIXELS)")


def decode_rgb(src: str | os.PathLike[str] | bytes, exif: str = "ignore"
               ) -> tuple[np.ndarray, int]:
    """RGB uint8 (H, W, 3) from a file path or encoded bytes, and the file's EXIF orientation
    (1 when absent). PIL's strict loader: a truncated or corrupt file raises (``OSError`` /
    ``ValueError``). ``exif``: "ignore" (stored pixels) or "apply" (the tag's rotation)."""
    from PIL import Image, ImageOps

    if exif not in EXIF_MODES:
        raise ValueError(f"exif orientation must be one of {EXIF_MODES}, got {exif!r}")
    fp = io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else os.fspath(src)
    try:
        with warnings.catch_warnings():  # over the limit is refused just below, not warned
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(fp)  # reads the header only
    except Image.DecompressionBombError as e:
        raise ValueError(str(e)) from None
    with opened as im:
        check_pixels(im.width, im.height, "image")
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


def load_rgb_image(path: str | os.PathLike[str] | None, exif: str = "ignore"
                   ) -> np.ndarray:
    """An RGB uint8 (H, W, 3) image from ``path``; the bundled astronaut photo when None."""
    if path is None:
        return real_photo()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image not found: {path}")
    try:
        return decode_rgb(path, exif)[0]
    except (OSError, SyntaxError) as e:  # PIL: UnidentifiedImageError is an OSError
        raise ValueError(f"cannot decode image {path!r} (not an image, or corrupt): {e}") from e


def real_photo(size: int | None = None) -> np.ndarray:
    """An RGB uint8 photo from scikit-image's bundled data (no download): 512x512, or resized
    to ``size`` x ``size``."""
    from skimage import data

    img = data.astronaut()
    if size is not None:
        import cv2

        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(img)


def resize_and_pad_uint8(img: np.ndarray, img_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """SAM's ResizeLongestSide, then zero padding to a square, kept uint8: (3, S, S) and the
    resized (h, w). Padding in uint8 is exact because SAM pads *after* normalising: callers
    normalise the (h, w) region only (``normalize``)."""
    from segment_anything.utils.transforms import ResizeLongestSide

    resized = ResizeLongestSide(img_size).apply_image(img)
    h, w = resized.shape[:2]
    out = np.zeros((img_size, img_size, 3), np.uint8)
    out[:h, :w] = resized
    return torch.from_numpy(out).permute(2, 0, 1).contiguous(), (h, w)


def sam_preprocess(img: np.ndarray, img_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """What ``SamPredictor.set_image`` feeds the encoder, for one HxWx3 uint8 RGB image:
    ResizeLongestSide, (x - mean) / std in fp32, zero padding to (3, S, S)."""
    x, (h, w) = resize_and_pad_uint8(img, img_size)
    out = torch.zeros(3, img_size, img_size)
    mean = torch.tensor(PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD).view(3, 1, 1)
    out[:, :h, :w] = (x[:, :h, :w].float() - mean) / std
    return out, (h, w)
