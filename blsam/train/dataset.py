"""The SA-1B training ``Dataset``: one sample per (epoch, index), and its ``collate``.

A corrupt jpg/json is replaced by the next image when read (so every rank still sees full
batches and DDP stays in step), logged and counted; an image with no usable annotation left is
replaced like a damaged one. Masks covering more than ``max_mask_fraction`` of the image are
dropped (SAM's training rule). Everything random about a sample (which masks, which prompts) is
seeded by (seed, epoch, index).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..segmentation import AnnotationError
from ..specs import check_img_size
from ..utils.images import resize_and_pad_uint8, sam_preprocess
from . import packed_cache
from .annotations import (
    LOW_RES_FACTOR,
    MAX_MASK_FRACTION,
    check_annotation,
    decode_rle,
    downsample_mask,
    resize_mask,
)
from .prompts import PROMPT_TYPES, choose_prompt, mask_box, noisy_box, sample_points
from .sa1b_index import DamagedDataError, Record

log = logging.getLogger("blsam.train.data")  # the data log's name, as before the split


def preprocess_image(img: np.ndarray, img_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """SAM preprocessing: ResizeLongestSide, normalise with SAM's mean/std, pad to square."""
    return sam_preprocess(img, img_size)


def decode_jpeg(data: bytes) -> np.ndarray:
    """RGB uint8; raises on corrupt or truncated files (PIL's strict loader). The EXIF
    orientation is ignored, as SA-1B's masks are drawn on the stored pixels: the one reader
    of training and evaluation (``blsam.utils.images.decode_rgb``)."""
    from ..utils.images import decode_rgb

    return decode_rgb(data, "ignore")[0]


class SA1BDataset(torch.utils.data.Dataset):
    """Items are indexed by ``(epoch, index)`` (what ``EpochBatchSampler`` yields).

    A sample: ``image`` (3, S, S) SAM-normalised and padded; ``masks`` (M, S/4, S/4) float
    {0,1} low-res targets; ``boxes`` (M, 4) XYXY or ``points`` (M, P, 2) + ``labels`` (M, P)
    in the S-pixel frame (integer pixel indices, SAM's convention: its prompt encoder adds the
    half pixel); ``kind`` (box | point | points, or "val"); ``key``; ``teacher`` (cached
    embedding or None); ``skipped`` (names of damaged items replaced by this one); ``bad_ann``
    and ``large_ann`` (annotations skipped as invalid / larger than ``max_mask_fraction``);
    ``seed`` (for the interactive clicks drawn on the device).

    ``val=True``: every mask gets both an exact box and SAM's centre click (the pixel farthest
    from the mask boundary), no noise: the same prompts at every validation.
    """

    def __init__(
        self,
        records: Sequence[Record],
        img_size: int = 1024,
        masks_per_image: int = 16,
        prompt_types: Sequence[str] = PROMPT_TYPES,
        max_points: int = 3,
        seed: int = 0,
        teacher_cache: str | None = None,
        with_targets: bool = True,
        max_retries: int = 16,
        max_mask_fraction: float = MAX_MASK_FRACTION,
        val: bool = False,
        uint8_images: bool = False,
    ) -> None:
        bad = [t for t in prompt_types if t not in PROMPT_TYPES]
        if bad or not prompt_types:
            raise ValueError(f"prompt types must be among {PROMPT_TYPES}, got {list(prompt_types)}")
        check_img_size(img_size)
        self.records = list(records)
        self.img_size = img_size
        self.masks_per_image = masks_per_image
        self.prompt_types = tuple(prompt_types)
        self.max_points = max_points
        self.seed = seed
        self.teacher_cache = teacher_cache
        self.with_targets = with_targets
        self.max_retries = max_retries
        self.max_mask_fraction = max_mask_fraction
        self.val = val
        self.uint8_images = uint8_images  # normalised on the device (transfer.normalize_images)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item: Any) -> dict[str, Any]:
        epoch, idx = item if isinstance(item, tuple) else (0, int(item))
        skipped: list[str] = []
        why = ""
        for attempt in range(min(self.max_retries, len(self.records))):
            j = (idx + attempt) % len(self.records)
            rec = self.records[j]
            try:
                sample = self.load(rec, epoch, j)
            except Exception as e:  # corrupt jpg/json, unreadable member: count and move on
                log.warning("skipping %s: %s: %s", rec.name, type(e).__name__, e)
                skipped.append(rec.name)
                why = why or f"{type(e).__name__}: {e}"
                continue
            sample["skipped"] = skipped
            return sample
        raise DamagedDataError(
            f"{len(skipped)} images in a row could not be used (from image {idx} of "
            f"{len(self.records)}), e.g. {', '.join(skipped[:3])}; the first: "
            f"{' '.join(why.split())[:200]}: the data is damaged or not SA-1B (every image is "
            f"logged above)")

    def load(self, rec: Record, epoch: int, index: int) -> dict[str, Any]:
        meta = json.loads(rec.json.read().decode("utf-8"))
        img = decode_jpeg(rec.jpg.read())
        info = meta["image"]
        if (img.shape[0], img.shape[1]) != (int(info["height"]), int(info["width"])):
            raise ValueError(f"jpg is {img.shape[:2]}, json says {info['height']}x{info['width']}")
        sample = self.base_sample(rec.key, img)
        if self.with_targets:
            sample.update(self.targets(meta["annotations"], img.shape[:2], sample["hw"], epoch,
                                       index))
        return sample

    def base_sample(self, key: str, img: np.ndarray) -> dict[str, Any]:
        """The image part of a sample (every source's): pixels resized and padded, the
        resized (h, w), the cached teacher row (one memory-mapped row, None if absent)."""
        image, hw = (resize_and_pad_uint8 if self.uint8_images else preprocess_image)(
            img, self.img_size)
        sample: dict[str, Any] = {"image": image, "key": key, "hw": hw, "teacher": None}
        if self.teacher_cache:
            sample["teacher"] = packed_cache.lookup(self.teacher_cache, key)
        return sample

    def decode_mask(self, ann: Any, hw: tuple[int, int]) -> np.ndarray:
        """One annotation's (h, w) mask, checked against what the file claims (raises
        ``AnnotationError`` / ``ValueError`` for a bad one); other sources override it."""
        check_annotation(ann, hw)
        return decode_rle(ann["segmentation"])

    def targets(self, anns: list[Any], orig_hw: tuple[int, int],
                new_hw: tuple[int, int], epoch: int, index: int) -> dict[str, Any]:
        """Sample masks, check and decode only those, resize/pad like the image, draw prompts."""
        rng = np.random.default_rng([self.seed, epoch, index])
        s = self.img_size
        order = rng.permutation(len(anns))  # decode lazily: stop once enough masks survive
        masks, full = [], []
        bad, large = 0, 0
        for a in order:
            ann = anns[a]
            try:
                m = self.decode_mask(ann, orig_hw)
            except (AnnotationError, KeyError, TypeError, ValueError) as e:
                log.debug("bad annotation: %s", e)
                bad += 1
                continue
            if m.sum() > self.max_mask_fraction * m.size:
                large += 1
                continue
            m = resize_mask(m, new_hw)
            if not m.any():  # vanished when shrunk
                continue
            padded = np.zeros((s, s), bool)
            padded[: new_hw[0], : new_hw[1]] = m
            low = downsample_mask(padded, LOW_RES_FACTOR)
            if not low.any():
                continue
            full.append(padded)
            masks.append(low)
            if len(masks) == self.masks_per_image:
                break
        if not masks:
            raise ValueError(f"no usable annotation ({len(anns)} in the json, {bad} invalid, "
                             f"{large} larger than {self.max_mask_fraction:g} of the image)")
        out: dict[str, Any] = {"masks": torch.from_numpy(np.stack(masks)), "bad_ann": bad,
                               "large_ann": large}
        if self.val:
            from ..prompts import center_point

            out["kind"] = "val"
            out["boxes"] = torch.from_numpy(np.stack([mask_box(m) for m in full]))
            out["points"] = torch.from_numpy(
                np.stack([center_point(m) for m in full]).astype(np.float32))
            out["labels"] = torch.ones(out["points"].shape[:2], dtype=torch.int64)
            return out
        kind, n_pts = choose_prompt(rng, self.prompt_types, self.max_points)
        out["kind"] = kind
        if kind == "box":
            out["boxes"] = torch.from_numpy(np.stack([noisy_box(m, rng, s) for m in full]))
        else:
            out["points"] = torch.from_numpy(np.stack([sample_points(m, n_pts, rng)
                                                       for m in full]).astype(np.float32))
            out["labels"] = torch.ones(out["points"].shape[:2], dtype=torch.int64)
        out["seed"] = int(rng.integers(2 ** 62))  # interactive clicks (drawn on the device)
        return out


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack images (and cached teacher embeddings); keep per-image targets as lists."""
    batch: dict[str, Any] = {"image": torch.stack([s["image"] for s in samples])}
    for k in ("key", "hw", "teacher", "kind", "masks", "boxes", "points", "labels", "seed"):
        batch[k] = [s.get(k) for s in samples]
    batch["skipped"] = [n for s in samples for n in s["skipped"]]
    batch["bad_ann"] = sum(s.get("bad_ann", 0) for s in samples)
    batch["large_ann"] = sum(s.get("large_ann", 0) for s in samples)
    return batch
