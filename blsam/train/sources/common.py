"""What the file-based sources (COCO, image folders) share: the record of one image file, the
seeded subset, and the key digest that names an image list."""
from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

log = logging.getLogger("blsam.train")
T = TypeVar("T")


@dataclass(frozen=True)
class ImageRecord:
    """One image file of a COCO set or an image folder. ``key`` (the teacher-cache key) is
    the file's name relative to the source root; ``image_id`` is COCO's (-1 for a folder)."""

    key: str
    path: str
    image_id: int = -1

    @property
    def name(self) -> str:
        """Human-readable location for warnings."""
        return self.path


def pick_fraction(items: list[T], fraction: float, seed: int, what: str,
                  info: dict[str, Any]) -> list[T]:
    """The seeded ``fraction`` of ``items`` in their order (SA-1B's per-image rule), with a
    warning when it drops images: the shipped configs select SA-1B's 2%."""
    info["images_indexed"] = len(items)
    if fraction >= 1.0:
        info.update({"images": len(items), "mode": "all"})
        return list(items)
    n = max(1, round(fraction * len(items)))
    keep = sorted(random.Random(seed).sample(range(len(items)), n))
    log.warning("%s: --data-fraction %g selects %d of %d images (the shipped configs select "
                "SA-1B's 2%%: pass --data-fraction 1 to train on all of them)", what, fraction,
                n, len(items))
    info.update({"images": n, "mode": "images"})
    return [items[i] for i in keep]


def keys_sha(keys: Sequence[str]) -> str:
    """A short digest of an image list (sorted keys)."""
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:16]
