"""SA-1B's index: ``sa_XXXXXX.tar`` shards (or folders) of ``sa_N.jpg`` + ``sa_N.json`` as
records, and the seeded training / validation selection.

Tar members are indexed once by name (header scan, no extraction) and later read straight from
their data offset, so nothing is ever written to a path taken from an archive, and a worker
re-reads one member without re-parsing the tar. A truncated tar member is dropped when indexing
(logged with the member name and counted).
"""
from __future__ import annotations

import logging
import os
import random
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import UserError

log = logging.getLogger("blsam.train.data")  # the data log's name, as before the split


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


def _pairs(files: dict[str, Member], shard: str, skipped: list[str]) -> list[Record]:
    """Match sa_N.jpg with sa_N.json in the same folder; an unmatched half is logged and
    counted. The same stem in two folders is refused (``_check_unique_keys``): the record key
    (teacher cache, validation split) is the stem, so one of the two would silently go."""
    stems: dict[str, dict[str, Member]] = {}
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
    seen: dict[str, Record] = {}
    dups = []
    for r in records:
        if r.key in seen:
            dups.append(f"{seen[r.key].name} and {r.name}")
        seen.setdefault(r.key, r)
    if dups:
        raise DataError(f"{len(dups)} image name(s) appear more than once in --data, e.g. "
                        f"{'; '.join(dups[:3])}: remove the copies (image names are the "
                        f"teacher-cache and validation keys)")


def index_tar(path: str, skipped: list[str]) -> list[Record]:
    """Records of one shard; members whose data runs past the end of the file are dropped."""
    size = os.path.getsize(path)
    files: dict[str, Member] = {}
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


def index_folder(path: str, skipped: list[str]) -> list[Record]:
    files = {n: Member(os.path.join(path, n)) for n in os.listdir(path)
             if os.path.isfile(os.path.join(path, n))}
    return _pairs(files, path, skipped)


def list_shards(data: str) -> tuple[list[str], bool]:
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
    data: str, shards: Sequence[str] | None = None, fraction: float = 1.0, seed: int = 0,
    info: dict[str, Any] | None = None,
) -> tuple[list[Record], list[str]]:
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
    skipped: list[str] = []
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
                       ) -> list[Record]:
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
    out: list[Record] = []
    skipped: list[str] = []
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
                 ) -> tuple[list[Record], list[Record]]:
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
