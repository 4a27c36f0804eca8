"""SA-1B as Meta distributes it: ``sa_XXXXXX.tar`` shards of ``sa_N.jpg`` + ``sa_N.json``.

``--data`` may be a folder of tars, a folder of extracted jpg/json pairs, or one tar. Tar
members are indexed once by name (header scan, no extraction) and later read straight from
their data offset, so nothing is ever written to a path taken from an archive, and a worker
re-reads one member without re-parsing the tar.

Damaged inputs never stop a run: a truncated tar member is dropped when indexing, a corrupt
jpg/json is replaced by the next image when read (so every rank still sees full batches and
DDP stays in step); both are logged with the member name and counted.

Annotations are checked before they become targets: the RLE must add up to height x width
(an empty or short ``counts`` string would otherwise decode to uninitialised memory), and the
decoded area and box must agree with the JSON's ``area`` and ``bbox``. A bad annotation is
skipped and counted; an image with no usable annotation left is replaced like a damaged one.
Masks covering more than ``max_mask_fraction`` of the image are dropped (SAM's training rule).

Everything random about a sample (which masks, which prompts) is seeded by
(seed, epoch, index), and the batch sampler is a pure function of (seed, epoch, rank), so a run
resumed at (epoch, batch) sees exactly the batches the uninterrupted run would have seen.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import tarfile
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import UserError
from ..segmentation import AnnotationError, check_rle, rle_run_lengths  # noqa: F401  (D.*)
from . import packed_cache
from .prompts import PROMPT_TYPES, choose_prompt, mask_box, noisy_box, sample_points
from .sampler import EpochBatchSampler  # noqa: F401  (its home before sources had one)
from ..specs import check_img_size
from ..utils.images import resize_and_pad_uint8, sam_preprocess

log = logging.getLogger(__name__)

LOW_RES_FACTOR = 4  # SAM's decoder predicts masks at img_size / 4 (256 px at 1024)


MAX_MASK_FRACTION = 0.9  # SAM drops masks that cover more than 90% of the image
AREA_TOL, BOX_TOL_PX = 0.01, 2.0  # decoded vs JSON: 1% of the area (>= 2 px), 2 px + 1% of side


class DataError(UserError):
    """``--data`` cannot be used (missing, empty, no shard matches)."""


class DamagedDataError(DataError):
    """Every image of a row could not be used: the data, not one file, is damaged. A
    DataLoader re-raises a worker's error as ``type(e)(its text + the worker's traceback)``:
    only the original message is kept, so the CLI still prints one line."""

    def __init__(self, message: str) -> None:
        tag = f"{type(self).__name__}: "
        if "Original Traceback" in message and tag in message:
            message = message.rsplit(tag, 1)[1].strip()
        super().__init__(message)


def add_data_args(parser: argparse.ArgumentParser, require_data: bool = False
                  ) -> argparse._ArgumentGroup:
    """The image-selection flags, one definition for tools/train.py and tools/cache_teacher.py:
    the same flags must pick the same images, or the teacher cache misses the training set."""
    g = parser.add_argument_group("data selection")
    from .sources.spec import add_source_args

    g.add_argument("--data", default=None,
                   help="sa1b: folder of sa_*.tar, folder of jpg/json pairs, or one tar; "
                        "images: the folder of images")
    add_source_args(g)
    g.add_argument("--shards", nargs="+", default=None,
                   help="use only these tar shards (sa_000020 or sa_000020.tar)")
    g.add_argument("--data-fraction", type=float, default=0.02,
                   help="seeded fraction of the images: whole shards when it is >= 1 shard's "
                        "worth, otherwise single images (a warning says so)")
    g.add_argument("--seed", type=int, default=0,
                   help="subset, data order, masks, prompts and model init")
    g.add_argument("--num-workers", type=int, default=2, help="DataLoader workers per process")
    return g


@dataclass(frozen=True)
class Member:
    """Where one file's bytes are: a loose file (offset -1) or a tar member's data range."""

    path: str
    offset: int = -1
    size: int = -1

    def read(self) -> bytes:
        if self.offset < 0:
            with open(self.path, "rb") as f:
                return f.read()
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"truncated tar member: {len(data)} of {self.size} bytes")
        return data


@dataclass(frozen=True)
class Record:
    key: str  # file stem, "sa_N" (N is SA-1B's image_id); the teacher-cache key
    shard: str  # tar file name or folder path
    jpg: Member
    json: Member
    member: str = ""  # path inside the shard without extension ("" : the key)

    @property
    def name(self) -> str:
        """Human-readable location for warnings: shard:member."""
        return f"{self.shard}:{self.member or self.key}"


def _pairs(files: Dict[str, Member], shard: str, skipped: List[str]) -> List[Record]:
    """Match sa_N.jpg with sa_N.json in the same folder; an unmatched half is logged and
    counted. The same stem in two folders is refused (``_check_unique_keys``): the record key
    (teacher cache, validation split) is the stem, so one of the two would silently go."""
    stems: Dict[str, Dict[str, Member]] = {}
    for name, m in files.items():
        base, ext = os.path.splitext(name)
        if ext.lower() in (".jpg", ".jpeg", ".json"):
            stems.setdefault(base, {})["json" if ext.lower() == ".json" else "jpg"] = m
    out = []
    for base in sorted(stems):
        d, stem = stems[base], os.path.basename(base)
        if "jpg" in d and "json" in d:
            out.append(Record(stem, shard, d["jpg"], d["json"], base))
        else:
            log.warning("skipping %s:%s: no matching %s", shard, base,
                        "json" if "jpg" in d else "jpg")
            skipped.append(f"{shard}:{base}")
    _check_unique_keys(out)
    return out


def _check_unique_keys(records: Sequence[Record]) -> None:
    """``DataError`` when two records share a key (an image copied into two folders or two
    shards): its teacher embedding, its mask choice and the train / validation split would
    be shared by two images, or one dropped."""
    seen: Dict[str, Record] = {}
    dups = []
    for r in records:
        if r.key in seen:
            dups.append(f"{seen[r.key].name} and {r.name}")
        seen.setdefault(r.key, r)
    if dups:
        raise DataError(f"{len(dups)} image name(s) appear more than once in --data, e.g. "
                        f"{'; '.join(dups[:3])}: remove the copies (image names are the "
                        f"teacher-cache and validation keys)")


def index_tar(path: str, skipped: List[str]) -> List[Record]:
    """Records of one shard; members whose data runs past the end of the file are dropped."""
    size = os.path.getsize(path)
    files: Dict[str, Member] = {}
    shard = os.path.basename(path)
    cut = False  # a member ran past the end: the archive ends there, nothing more to report
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                if m.offset_data + m.size > size:
                    log.warning("skipping %s:%s: truncated tar member", shard, m.name)
                    skipped.append(f"{shard}:{m.name}")
                    cut = True
                    continue
                files[m.name] = Member(path, m.offset_data, m.size)
    except (tarfile.TarError, EOFError, OSError) as e:  # damaged header: keep what was read
        log.warning("tar %s is damaged after %d members (%s); using those", shard, len(files), e)
        if not cut:
            skipped.append(f"{shard}:<rest of archive>")
    return _pairs(files, shard, skipped)


def index_folder(path: str, skipped: List[str]) -> List[Record]:
    files = {n: Member(os.path.join(path, n)) for n in os.listdir(path)
             if os.path.isfile(os.path.join(path, n))}
    return _pairs(files, path, skipped)


def list_shards(data: str) -> Tuple[List[str], bool]:
    """(tar paths, has loose pairs) under ``data``; a clear error if missing or empty."""
    if not data:
        raise DataError("no --data given")
    if not os.path.exists(data):
        raise DataError(f"--data {data!r} does not exist")
    if os.path.isfile(data):
        if not tarfile.is_tarfile(data):
            raise DataError(f"--data {data!r} is a file but not a tar shard")
        return [data], False
    names = sorted(os.listdir(data))
    tars = [os.path.join(data, n) for n in names if n.endswith(".tar")]
    loose = any(n.lower().endswith((".jpg", ".jpeg")) for n in names)
    if not tars and not loose:
        raise DataError(f"--data {data!r} holds no sa_*.tar shards and no sa_*.jpg/json pairs")
    return tars, loose


def select_records(
    data: str, shards: Optional[Sequence[str]] = None, fraction: float = 1.0, seed: int = 0,
    info: Optional[Dict[str, Any]] = None,
) -> Tuple[List[Record], List[str]]:
    """Index ``data`` and pick the training subset; returns (records, skipped names).

    ``shards``: tar names (``sa_000020`` or ``sa_000020.tar``) to use. ``fraction`` of the
    images, chosen by ``seed``: when it amounts to at least one whole tar, whole shards are drawn
    (2% of 1000 SA-1B shards = 20 shards, and only those are opened); otherwise single images,
    with a warning (2% of 20 downloaded shards is 4.4k images, not the paper's 220k). What was
    selected is logged and, when ``info`` is given, stored in it (shards, images, mode).
    """
    if not 0.0 < fraction <= 1.0:
        raise DataError(f"--data-fraction must be in (0, 1], got {fraction}")
    tars, loose = list_shards(data)
    if shards:
        want = {s[:-4] if s.endswith(".tar") else s for s in shards}
        tars = [t for t in tars if os.path.basename(t)[:-4] in want]
        missing = want - {os.path.basename(t)[:-4] for t in tars}
        if missing:
            raise DataError(f"--shards not found under {data!r}: {sorted(missing)}")
        loose = False
    n_tars = len(tars)
    rng = random.Random(seed)
    mode = "all"
    if len(tars) > 1 and not loose and fraction * len(tars) >= 1 and fraction < 1:
        n = max(1, round(fraction * len(tars)))
        tars = sorted(rng.sample(tars, n))
        fraction, mode = 1.0, "shards"
    skipped: List[str] = []
    records = [r for t in tars for r in index_tar(t, skipped)]
    if loose:
        records += index_folder(data, skipped)
    if not records:
        raise DataError(f"--data {data!r}: no usable jpg/json pairs found")
    _check_unique_keys(records)
    n_indexed = len(records)
    if fraction < 1.0:
        n = max(1, round(fraction * len(records)))
        keep = sorted(rng.sample(range(len(records)), n))
        records = [records[i] for i in keep]
        mode = "images"
        if n_tars > 1:
            log.warning(
                "--data-fraction %g of %d shards is less than one whole shard: selecting %d of "
                "%d images one by one instead of whole shards (pass --data-fraction 1 to train "
                "on every downloaded shard)", fraction, n_tars, len(records), n_indexed)
    log.info("data: %d of %d shards opened, %d images selected (%s)", len(tars), n_tars,
             len(records), {"all": "everything", "shards": "whole shards",
                            "images": "single images"}[mode])
    if info is not None:
        info.update({"shards_total": n_tars, "shards_selected": len(tars),
                     "images_indexed": n_indexed, "images": len(records), "mode": mode})
    return records, skipped


def select_val_records(data: str, exclude: Sequence[Record], n: int, seed: int = 0
                       ) -> List[Record]:
    """``n`` held-out images under ``data``, none of them in ``exclude`` (the training set).

    Shards the training set does not touch are indexed first (one or two usually suffice, so
    the other 990 are never opened); images of used shards that training left out come last.
    """
    tars, loose = list_shards(data)
    used_keys = {r.key for r in exclude}
    used_shards = {r.shard for r in exclude}
    rng = random.Random(seed + 1)
    fresh = [t for t in tars if os.path.basename(t) not in used_shards]
    rng.shuffle(fresh)
    order = fresh + [t for t in tars if os.path.basename(t) in used_shards]
    out: List[Record] = []
    skipped: List[str] = []
    for t in order:
        out += [r for r in index_tar(t, skipped) if r.key not in used_keys]
        if len(out) >= n:
            break
    if len(out) < n and loose:
        out += [r for r in index_folder(data, skipped) if r.key not in used_keys]
    if not out:
        raise DataError(f"--val-data {data!r} holds no image outside the training subset: "
                        f"pass --val-data with other images, select fewer training images, or "
                        f"--val-every 0 to train without validation")
    out = sorted(out[:n] if len(out) <= n else rng.sample(out, n), key=lambda r: r.key)
    log.info("validation: %d held-out images (%d asked for)", len(out), n)
    return out


def hold_out_val(records: Sequence[Record], n: int, seed: int = 0
                 ) -> Tuple[List[Record], List[Record]]:
    """Split ``n`` validation images off the training selection (seeded, the same on every
    rank); at least one image stays for training."""
    if len(records) < 2:
        raise DataError(f"{len(records)} image(s) selected: too few to hold any out for "
                        f"validation; pass --val-data or --val-every 0")
    n = min(n, len(records) // 2)
    rng = random.Random(seed + 2)
    held = set(rng.sample(range(len(records)), n))
    train = [r for i, r in enumerate(records) if i not in held]
    val = sorted((records[i] for i in held), key=lambda r: r.key)
    return train, val


def check_annotation(ann: Dict[str, Any], hw: Tuple[int, int]) -> None:
    """Raise ``AnnotationError`` unless the RLE covers exactly h*w pixels and its area and box
    agree with the JSON's ``area`` and ``bbox`` (tolerances ``AREA_TOL``, ``BOX_TOL_PX``)."""
    from pycocotools import mask as mask_utils

    seg = ann["segmentation"]
    h, w = hw
    runs = check_rle(seg, h, w)
    area = int(runs[1::2].sum())
    if area == 0:
        raise AnnotationError("empty mask")
    if "area" in ann and abs(area - float(ann["area"])) > max(2.0, AREA_TOL * area):
        raise AnnotationError(f"decoded area {area} != json area {ann['area']}")
    if "bbox" in ann:
        rle = {"size": [h, w], "counts": seg["counts"].encode("ascii")
               if isinstance(seg["counts"], str) else seg["counts"]}
        if not isinstance(rle["counts"], bytes):
            rle = mask_utils.frPyObjects(rle, h, w)
        box = np.asarray(mask_utils.toBbox(rle), np.float64)
        tol = BOX_TOL_PX + 0.01 * max(h, w)
        if np.abs(box - np.asarray(ann["bbox"], np.float64)).max() > tol:
            raise AnnotationError(f"decoded box {box.tolist()} != json bbox {ann['bbox']}")


def decode_rle(segmentation: Dict[str, Any]) -> np.ndarray:
    """COCO compressed RLE (SA-1B's ``counts`` string) -> (h, w) uint8 mask."""
    import warnings

    from pycocotools import mask as mask_utils

    rle = dict(segmentation)
    if isinstance(rle["counts"], str):
        rle["counts"] = rle["counts"].encode("ascii")
    with warnings.catch_warnings():  # pycocotools' numpy-2 copy= deprecation, not ours
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(rle)


def resize_mask(mask: np.ndarray, new_hw: Tuple[int, int]) -> np.ndarray:
    """Binary mask resized like the image (bilinear, threshold 0.5): (h, w) -> new_hw bool."""
    import cv2

    m = cv2.resize(mask.astype(np.float32), (new_hw[1], new_hw[0]),
                   interpolation=cv2.INTER_LINEAR)
    return m >= 0.5


def downsample_mask(mask: np.ndarray, factor: int) -> np.ndarray:
    """Padded full-size bool mask -> low-res float {0,1} target (area average >= 0.5)."""
    import cv2

    s = mask.shape[0] // factor
    m = cv2.resize(mask.astype(np.float32), (s, s), interpolation=cv2.INTER_AREA)
    return (m >= 0.5).astype(np.float32)


def preprocess_image(img: np.ndarray, img_size: int) -> Tuple[torch.Tensor, Tuple[int, int]]:
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
        teacher_cache: Optional[str] = None,
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

    def __getitem__(self, item: Any) -> Dict[str, Any]:
        epoch, idx = item if isinstance(item, tuple) else (0, int(item))
        skipped: List[str] = []
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

    def load(self, rec: Record, epoch: int, index: int) -> Dict[str, Any]:
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

    def base_sample(self, key: str, img: np.ndarray) -> Dict[str, Any]:
        """The image part of a sample (every source's): pixels resized and padded, the
        resized (h, w), the cached teacher row (one memory-mapped row, None if absent)."""
        image, hw = (resize_and_pad_uint8 if self.uint8_images else preprocess_image)(
            img, self.img_size)
        sample: Dict[str, Any] = {"image": image, "key": key, "hw": hw, "teacher": None}
        if self.teacher_cache:
            sample["teacher"] = packed_cache.lookup(self.teacher_cache, key)
        return sample

    def decode_mask(self, ann: Any, hw: Tuple[int, int]) -> np.ndarray:
        """One annotation's (h, w) mask, checked against what the file claims (raises
        ``AnnotationError`` / ``ValueError`` for a bad one); other sources override it."""
        check_annotation(ann, hw)
        return decode_rle(ann["segmentation"])

    def targets(self, anns: List[Any], orig_hw: Tuple[int, int],
                new_hw: Tuple[int, int], epoch: int, index: int) -> Dict[str, Any]:
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
        out: Dict[str, Any] = {"masks": torch.from_numpy(np.stack(masks)), "bad_ann": bad,
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


def collate(samples: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Stack images (and cached teacher embeddings); keep per-image targets as lists."""
    batch: Dict[str, Any] = {"image": torch.stack([s["image"] for s in samples])}
    for k in ("key", "hw", "teacher", "kind", "masks", "boxes", "points", "labels", "seed"):
        batch[k] = [s.get(k) for s in samples]
    batch["skipped"] = [n for s in samples for n in s["skipped"]]
    batch["bad_ann"] = sum(s.get("bad_ann", 0) for s in samples)
    batch["large_ann"] = sum(s.get("large_ann", 0) for s in samples)
    return batch
