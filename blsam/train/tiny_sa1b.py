"""Tiny SA-1B-format shards from scikit-image's bundled photos (no download).

Why: the data pipeline, the training loop and their tests need real jpg/json pairs in Meta's
exact layout (``sa_N.jpg`` + ``sa_N.json`` with COCO-RLE masks, packed in ``sa_XXXXXX.tar``),
and the masks should be real image regions (SLIC colour segments), not random noise.
"""
from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "cat", "camera",
          "retina")


def _photo(i: int, size: int) -> np.ndarray:
    """Photo number ``i`` (cycled) resized so its longest side is ``size``; RGB uint8."""
    import cv2
    from skimage import data

    img = getattr(data, PHOTOS[i % len(PHOTOS)])()
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    img = img[..., :3]
    h, w = img.shape[:2]
    s = size / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    return np.ascontiguousarray(cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA))


def _segments(img: np.ndarray, n: int, seed: int) -> list[np.ndarray]:
    """Up to ``n`` binary masks of real regions: SLIC superpixels plus their unions."""
    from skimage.segmentation import slic

    labels = slic(img, n_segments=max(2, n), compactness=10, start_label=0)
    masks = [labels == k for k in np.unique(labels)]
    masks = [m for m in masks if m.sum() >= 4]
    rng = np.random.default_rng(seed)
    base, used = len(masks), set()
    while len(masks) < n and base >= 2 and len(used) < base * (base - 1) // 2:
        a, b = sorted(rng.choice(base, 2, replace=False))  # unions give larger objects
        if (a, b) not in used:
            used.add((a, b))
            masks.append(masks[a] | masks[b])
    return masks[:n]


def make_record(image_id: int, img: np.ndarray, masks: list[np.ndarray]) -> dict:
    """SA-1B json for one image (same keys and types as Meta's release)."""
    from pycocotools import mask as mask_utils

    h, w = img.shape[:2]
    anns = []
    for k, m in enumerate(masks):
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        ys, xs = np.nonzero(m)
        j = len(xs) // 2
        anns.append({
            "id": image_id * 1000 + k,
            "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")},
            "bbox": [float(v) for v in mask_utils.toBbox(rle)],
            "area": int(m.sum()),
            "point_coords": [[float(xs[j]) + 0.5, float(ys[j]) + 0.5]],
            "predicted_iou": 0.9,
            "stability_score": 0.95,
            "crop_box": [0.0, 0.0, float(w), float(h)],
        })
    return {"image": {"image_id": image_id, "width": w, "height": h,
                      "file_name": f"sa_{image_id}.jpg"}, "annotations": anns}


def _jpeg(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tf.addfile(info, io.BytesIO(payload))


def write_tiny_sa1b(
    out_dir: str | os.PathLike,
    num_shards: int = 2,
    images_per_shard: int = 3,
    size: int = 96,
    masks_per_image: int = 6,
    fmt: str = "tar",
    seed: int = 0,
) -> list[str]:
    """Write shards ``sa_000000.tar``... (``fmt="tar"``) or loose ``sa_N.jpg``/``sa_N.json``
    pairs (``fmt="folder"``) into ``out_dir``; returns the written tar or jpg paths.

    Image ids run 1, 2, ... across shards; the same arguments give the same bytes either way.
    """
    if fmt not in ("tar", "folder"):
        raise ValueError(f"fmt must be 'tar' or 'folder', got {fmt!r}")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for s in range(num_shards):
        items = []
        for i in range(images_per_shard):
            image_id = s * images_per_shard + i + 1
            img = _photo(image_id - 1, size)
            rec = make_record(image_id, img, _segments(img, masks_per_image, seed + image_id))
            items.append((f"sa_{image_id}", _jpeg(img), json.dumps(rec).encode("utf-8")))
        if fmt == "tar":
            path = os.path.join(out_dir, f"sa_{s:06d}.tar")
            with tarfile.open(path, "w") as tf:
                for stem, jpg, js in items:
                    _add(tf, f"{stem}.jpg", jpg)
                    _add(tf, f"{stem}.json", js)
            written.append(path)
        else:
            for stem, jpg, js in items:
                for ext, payload in ((".jpg", jpg), (".json", js)):
                    with open(os.path.join(out_dir, stem + ext), "wb") as f:
                        f.write(payload)
                written.append(os.path.join(out_dir, stem + ".jpg"))
    return written
