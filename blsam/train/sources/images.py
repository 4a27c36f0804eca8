"""A folder of plain images (``--data-format images``): feature distillation only.

Why: the paper's loss is L_supervised + lambda_fd * L_fd, and the feature term needs no mask:
the frozen teacher's embedding is the only label. A sample carries no masks, so the student's
prompt encoder and mask decoder get no loss from it (``DistillModel`` skips images without
masks; a mixture's labelled images still train them). Files are found recursively by
extension (``IMAGE_EXTENSIONS``, any case); a corrupt or unreadable one is replaced by the
next image when read and counted, as SA-1B's reader does.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from ..dataset import SA1BDataset
from ..sa1b_index import DataError
from .common import ImageRecord, keys_sha, log
from .spec import IMAGE_EXTENSIONS, SourceSpec


def list_images(root: str) -> list[str]:
    """Paths relative to ``root`` ('/'-separated, sorted) of every image file below it; hidden
    folders and files are left out."""
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        rel = os.path.relpath(d, root)
        for f in files:
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS):
                out.append(f if rel == "." else f"{rel}/{f}".replace(os.sep, "/"))
    return sorted(out)


def index_images(spec: SourceSpec, info: dict[str, Any]
                 ) -> tuple[list[ImageRecord], dict[str, Any]]:
    """(a record per image file, source identity); a folder without images is a ``DataError``."""
    root = spec.data
    if not root or not os.path.isdir(root):
        raise DataError(f"--data {root!r}: no such folder")
    names = list_images(root)
    if not names:
        raise DataError(f"--data {root!r} holds no images ({' '.join(IMAGE_EXTENSIONS)}, "
                        f"searched recursively)")
    records = [ImageRecord(n, os.path.join(root, n)) for n in names]
    info.update({"format": "images", "supervised": False, "exif_orientation": spec.exif})
    log.info("data: images %s: %d image files; feature distillation only (no masks: the "
             "supervised loss is off for them)", root, len(names))
    identity = {"format": "images", "root": os.path.realpath(root), "files_sha": keys_sha(
        [f"{n}:{os.path.getsize(os.path.join(root, n))}" for n in names])}
    return records, identity


class ImageFolderDataset(SA1BDataset):
    """Samples of plain images: the image, its key and cached teacher row, no masks."""

    def __init__(self, records: list[ImageRecord], img_size: int = 1024, exif: str = "ignore",
                 **kw: Any) -> None:
        kw["with_targets"] = False
        super().__init__(records, img_size, **kw)
        self.exif = exif

    def load(self, rec: ImageRecord, epoch: int, index: int) -> dict[str, Any]:
        return self.base_sample(rec.key, read_pixels(rec.path, exif=self.exif))


def read_pixels(path: str, height: Any = None, width: Any = None, exif: str = "ignore"
                ) -> np.ndarray:
    """The evaluation's reader (whole-file check, PIL strict decode, size check, EXIF rule)."""
    from ...evaluation.datasets import read_image_oriented

    return read_image_oriented(path, height, width, exif)[0]
