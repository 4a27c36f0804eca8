"""COCO segmentations (polygons, compressed and uncompressed RLE): checking and decoding.

Why separate from the file reader: SA-1B's reader (``blsam.train.data``) checks its RLEs with
the same rules as the COCO / LVIS reader (``blsam.annotations``), so a mask that does not cover
its image exactly, or a polygon that would make pycocotools rasterise for minutes, is refused
the same way everywhere.
"""
from __future__ import annotations

from typing import Any

import numpy as np

POLYGON_RANGE = 2.0  # polygon coordinates must lie within +-2 * max(h, w)


def is_int(v: Any) -> bool:
    """A JSON integer (not a bool, str, list or float)."""
    return isinstance(v, int) and not isinstance(v, bool)


class AnnotationError(ValueError):
    """One annotation (object) whose fields or mask do not hold what they claim."""


def rle_run_lengths(counts: Any) -> np.ndarray:
    """Run lengths (int64) of a COCO RLE: a list as is, or the compressed string (pycocotools'
    format: 6-bit chunks from '0', 0x20 = more chunks follow, 0x10 in the last chunk = negative,
    runs from the fourth on are deltas to the run two back). Vectorised: SA-1B strings run to
    thousands of characters and every sampled annotation is checked."""
    if not isinstance(counts, str):
        if not isinstance(counts, (list, tuple)) or not all(is_int(c) for c in counts):
            raise AnnotationError("RLE counts must be a string or a list of integers")
        return np.asarray(counts, np.int64)
    if not counts:
        return np.zeros(0, np.int64)
    c = np.frombuffer(counts.encode("latin-1", "replace"), np.uint8).astype(np.int64) - 48
    if c.min() < 0 or c.max() >= 64:
        raise AnnotationError("RLE counts has characters outside the RLE alphabet")
    last = (c & 0x20) == 0  # the chunk that ends a number
    if not last[-1]:
        raise AnnotationError("RLE counts string ends inside a number")
    ends = np.flatnonzero(last)
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1
    if lengths.max() > 12:  # 60 bits: no real run needs more than 7 chunks
        raise AnnotationError("RLE counts holds an impossibly long number")
    k = np.arange(len(c)) - np.repeat(starts, lengths)
    x = np.add.reduceat((c & 0x1F) << (5 * k), starts)  # disjoint bits: sum == or
    neg = (c[ends] & 0x10) != 0
    x = np.where(neg, x - (np.int64(1) << (5 * lengths)), x)
    runs = x.copy()
    for first in (3, 4):  # runs[m] = x[m] + runs[m - 2] for m >= 3, per parity chain
        if len(runs) > first:
            runs[first - 2::2] = np.cumsum(runs[first - 2::2])
    return runs


def check_rle(seg: dict[str, Any], h: int, w: int) -> np.ndarray:
    """The run lengths of an RLE dict that covers exactly the (h, w) image; ``AnnotationError``
    otherwise (a short ``counts`` would decode to a mask of another size)."""
    size = seg.get("size")
    if not isinstance(size, (list, tuple)) or len(size) != 2 or not all(is_int(v) for v in size):
        raise AnnotationError(f"RLE size {str(size)[:40]} is not [height, width]")
    if [size[0], size[1]] != [h, w]:
        raise AnnotationError(f"RLE size {list(size)} != image size {[h, w]}")
    runs = rle_run_lengths(seg.get("counts"))
    if len(runs) == 0 or runs.min() < 0 or int(runs.sum()) != h * w:
        raise AnnotationError(f"RLE runs add up to {int(runs.sum()) if len(runs) else 0} "
                              f"pixels, not {h}x{w}={h * w}")
    return runs


def check_polygons(seg: list[Any], h: int, w: int) -> None:
    """Every ring: an even number >= 6 of finite numbers within +-``POLYGON_RANGE`` * max(h, w)
    (pycocotools' rasteriser is bounded by the coordinates, not the image)."""
    lim = POLYGON_RANGE * max(h, w)
    for ring in seg:
        if not isinstance(ring, (list, tuple)):
            raise AnnotationError(f"polygon ring is a {type(ring).__name__}, not a list")
        if len(ring) < 6 or len(ring) % 2:
            raise AnnotationError(f"degenerate polygon ring of {len(ring)} coordinates (needs "
                                  f"an even number >= 6: 3 points)")
        a = np.asarray(ring)
        if a.dtype.kind not in "iuf":
            raise AnnotationError("polygon with a non-numeric coordinate")
        if not np.all(np.isfinite(a)):
            raise AnnotationError("polygon with a non-finite coordinate")
        if np.abs(a).max() > lim:
            raise AnnotationError(f"polygon coordinate {float(np.abs(a).max()):g} out of range "
                                  f"for a {w}x{h} image")


def to_rle(seg: Any, h: int, w: int) -> dict[str, Any]:
    """A checked segmentation (polygons, uncompressed or compressed RLE) -> compressed RLE."""
    from pycocotools import mask as mask_utils

    if isinstance(seg, list):
        if not seg:
            return mask_utils.encode(np.zeros((h, w), dtype=np.uint8, order="F"))
        return mask_utils.merge(mask_utils.frPyObjects([list(map(float, r)) for r in seg], h, w))
    if isinstance(seg.get("counts"), list):
        return mask_utils.frPyObjects(seg, h, w)
    rle = dict(seg)
    if isinstance(rle["counts"], str):
        rle["counts"] = rle["counts"].encode("ascii")
    return rle


def mask_area(seg: Any, h: int, w: int) -> int:
    from pycocotools import mask as mask_utils

    return int(mask_utils.area(to_rle(seg, h, w)))


def perimeter(ring: list[float]) -> float:
    p = np.asarray(ring, np.float64).reshape(-1, 2)
    return float(np.linalg.norm(p - np.roll(p, 1, axis=0), axis=1).sum())
