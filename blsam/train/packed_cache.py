"""Packed teacher cache: fp16 embeddings in a few large files, read through ``np.memmap``.

Why: one file per image means ~220k files for 2% of SA-1B, a stat of each of them on every rank
at start, and nothing tying the numbers to the teacher that made them. Here each writer rank
appends raw fp16 rows to one part file, and a single ``index.json`` (written last, atomically,
by rank 0) names the parts, their keys and the provenance: teacher variant, sha256 of the
teacher checkpoint file, img_size, row shape. A reader maps each part once and copies out one
row (2 MiB at 1024 px) per image; nothing is loaded whole.

Layout of ``<dir>``::

    index.json                    {"format", "teacher", "teacher_sha256", "img_size", "shape",
                                   "dtype", "parts": [{"file", "count", "bytes", "sha256"}],
                                   "keys": [[...], ...]}
    part_00000-of-00008.bin       rank 0's rows, C-contiguous fp16 (count, 256, S/16, S/16)
    part_00000-of-00008.json      rank 0's keys and provenance (lets an interrupted run resume)
    .verified.json                parts already checked against their sha256 (by inode, size,
                                  mtime and ctime: a part copied in since is checked again)

The index is not trusted either: a part's ``file`` must be a plain name inside the folder (no
``../other_cache/...``), and each part's size and sha256 (recorded by its writer) are checked
before a run uses the cache (``verify_parts``, once per copy of the file), so a part copied
from another cache is refused instead of training on the wrong embeddings.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from ..utils.files import file_sha256, write_json_atomic

FORMAT = "blsam-teacher-cache/1"
INDEX = "index.json"
VERIFIED = ".verified.json"
DTYPE = np.float16
EMBED_DIM = 256  # SAM's neck output channels


class CacheError(UserError):
    """A teacher cache that is missing, damaged, or made by another teacher / image size."""


def provenance(teacher: str, sam_checkpoint: str, img_size: int) -> dict[str, Any]:
    """What a cache must have been made with to be valid for a run."""
    return {"format": FORMAT, "teacher": teacher, "teacher_sha256": file_sha256(sam_checkpoint),
            "img_size": int(img_size), "shape": [EMBED_DIM, img_size // 16, img_size // 16],
            "dtype": "float16"}


def _checksum(path: str) -> dict[str, Any]:
    """What a part's reader checks: its size and sha256 (one read of the part, by the rank that
    wrote it: far less than the teacher's forward passes that made it)."""
    return {"bytes": os.path.getsize(path), "sha256": file_sha256(path)}


def _part_name(rank: int, world: int) -> str:
    return f"part_{rank:05d}-of-{world:05d}"


def _mismatch(what: str, have: dict[str, Any], want: dict[str, Any]) -> str | None:
    keys = ("format", "teacher", "teacher_sha256", "img_size", "shape", "dtype")
    diff = [k for k in keys if have.get(k) != want.get(k)]
    if not diff:
        return None
    return (f"{what} was made with " + ", ".join(f"{k}={have.get(k)!r}" for k in diff)
            + "; this run needs " + ", ".join(f"{k}={want.get(k)!r}" for k in diff))


class PartWriter:
    """One rank's part, written in chunks that survive a kill.

    Rows are appended to ``<part>.bin.partial``; every ``chunk_rows`` rows the file is flushed
    and a small chunk index ``<part>.chunk_<i>.json`` (provenance, first row, keys) is written
    atomically. A new writer for the same part and the same provenance (teacher, assigned
    images) resumes after the last complete chunk: ``keys`` lists what is already there, the
    file is truncated to it. ``close`` renames the file into place, writes ``<part>.json`` and
    drops the chunk indexes.
    """

    def __init__(self, cache_dir: str, rank: int, world: int, meta: dict[str, Any],
                 chunk_rows: int = 256) -> None:
        if chunk_rows < 1:
            raise ValueError(f"chunk rows must be >= 1, got {chunk_rows}")
        os.makedirs(cache_dir, exist_ok=True)
        self.dir, self.name = cache_dir, _part_name(rank, world)
        self.bin = os.path.join(cache_dir, self.name + ".bin")
        self.partial = self.bin + ".partial"
        self.meta, self.chunk_rows = meta, int(chunk_rows)
        self.row_bytes = int(np.prod(meta["shape"])) * np.dtype(DTYPE).itemsize
        self.keys: list[str] = []  # committed rows
        self.pending: list[str] = []  # rows written since the last chunk index
        self.chunks = 0
        self.resumed_rows = self._resume()
        self.f = open(self.partial, "r+b" if os.path.exists(self.partial) else "wb")
        self.f.truncate(len(self.keys) * self.row_bytes)
        self.f.seek(0, os.SEEK_END)

    def _chunk_path(self, i: int) -> str:
        return os.path.join(self.dir, f"{self.name}.chunk_{i:05d}.json")

    def _chunk_files(self) -> list[str]:
        pre = self.name + ".chunk_"
        return sorted(f for f in os.listdir(self.dir) if f.startswith(pre) and f.endswith(".json"))

    def _resume(self) -> int:
        """Keep the complete chunks of an earlier writer of this part (same provenance and
        assigned images, contiguous, backed by enough bytes); drop everything after them."""
        size = os.path.getsize(self.partial) if os.path.exists(self.partial) else 0
        i = 0
        while True:
            try:
                with open(self._chunk_path(i), encoding="utf-8") as f:
                    chunk = json.load(f)
            except (OSError, ValueError):
                break
            ok = (_mismatch("", chunk, self.meta) is None
                  and chunk.get("assigned_sha256") == self.meta.get("assigned_sha256")
                  and chunk.get("start") == len(self.keys)
                  and (len(self.keys) + len(chunk.get("keys", ()))) * self.row_bytes <= size)
            if not ok:
                break
            self.keys += list(chunk["keys"])
            i += 1
        self.chunks = i
        for f in self._chunk_files():  # chunks after the first bad one are not trusted
            if int(f.rsplit("_", 1)[1][:-5]) >= i:
                os.remove(os.path.join(self.dir, f))
        if not self.keys and os.path.exists(self.partial):
            os.remove(self.partial)
        return len(self.keys)

    def append(self, key: str, emb: torch.Tensor) -> None:
        arr = emb.detach().to("cpu", torch.float16).contiguous().numpy()
        if list(arr.shape) != self.meta["shape"]:
            raise ValueError(f"embedding for {key} is {list(arr.shape)}, "
                             f"cache rows are {self.meta['shape']}")
        self.f.write(arr.tobytes())
        self.pending.append(key)
        if len(self.pending) >= self.chunk_rows:
            self.commit()

    def commit(self) -> None:
        """Make the rows written so far durable and resumable (one small chunk index)."""
        if not self.pending:
            return
        self.f.flush()
        os.fsync(self.f.fileno())
        write_json_atomic({**self.meta, "start": len(self.keys), "keys": self.pending},
                     self._chunk_path(self.chunks))
        self.keys += self.pending
        self.pending = []
        self.chunks += 1

    def close(self) -> str:
        self.commit()
        self.f.close()
        os.replace(self.partial, self.bin)
        write_json_atomic({**self.meta, "keys": self.keys, **_checksum(self.bin)},
                          self.bin[:-4] + ".json")
        for f in self._chunk_files():
            os.remove(os.path.join(self.dir, f))
        return self.bin

    def abort(self) -> None:
        """After an error: keep every complete row for the next run (a kill keeps the rows up to
        the last chunk index)."""
        if not self.f.closed:
            try:
                self.commit()
            finally:
                self.f.close()


_TMP = re.compile(r"^\.?(?P<base>.+)\.tmp\.(?P<pid>\d+)$")  # utils.files: .<name>.tmp.<pid>


def remove_stale_temps(cache_dir: str, rank: int, world: int) -> list[str]:
    """Remove temporary files (``*.tmp.<pid>``) that no live writer of this run can own: this
    rank's own part (it is the part's only writer) and, on rank 0, the index and the parts of
    other world sizes. Returns the removed names (a killed writer leaves them behind)."""
    if not os.path.isdir(cache_dir):
        return []
    own = _part_name(rank, world)
    removed = []
    for f in sorted(os.listdir(cache_dir)):
        m = _TMP.match(f)
        if m is None:
            continue
        base = m.group("base")
        other_world = base.startswith("part_") and f"-of-{world:05d}." not in base
        if base.startswith(own + ".") or (rank == 0 and (base == INDEX or other_world)):
            try:
                os.remove(os.path.join(cache_dir, f))
                removed.append(f)
            except FileNotFoundError:
                pass
    return removed


def finished_part(cache_dir: str, rank: int, world: int, meta: dict[str, Any]) -> bool:
    """True when this rank's part is already complete for the same teacher and the same
    assigned images (``meta["assigned_sha256"]``): an interrupted cache run skips it."""
    base = os.path.join(cache_dir, _part_name(rank, world))
    try:
        with open(base + ".json", encoding="utf-8") as f:
            have = json.load(f)
        size = os.path.getsize(base + ".bin")
    except (OSError, ValueError):
        return False
    row = int(np.prod(meta["shape"])) * np.dtype(DTYPE).itemsize
    return (_mismatch("", have, meta) is None
            and have.get("assigned_sha256") == meta.get("assigned_sha256")
            and size == row * len(have.get("keys", ())))


def write_index(cache_dir: str, world: int, meta: dict[str, Any]) -> dict[str, Any]:
    """Rank 0, after every part is closed: gather the parts into ``index.json`` (atomic)."""
    parts, keys, seen = [], [], set()  # type: List[Dict[str, Any]], List[List[str]], set
    for rank in range(world):
        name = _part_name(rank, world)
        with open(os.path.join(cache_dir, name + ".json"), encoding="utf-8") as f:
            part = json.load(f)
        bad = _mismatch(f"part {name}", part, meta)
        if bad:
            raise CacheError(bad)
        dup = seen.intersection(part["keys"])
        if dup:
            raise CacheError(f"part {name} repeats keys of an earlier part: {sorted(dup)[:5]}")
        seen.update(part["keys"])
        path = os.path.join(cache_dir, name + ".bin")
        check = {k: part[k] for k in ("bytes", "sha256") if k in part}
        if check.get("bytes") != os.path.getsize(path) or "sha256" not in check:
            check = _checksum(path)  # a part written before parts carried checksums
        parts.append({"file": name + ".bin", "count": len(part["keys"]), **check})
        keys.append(part["keys"])
    index = {**meta, "parts": parts, "keys": keys}
    write_json_atomic(index, os.path.join(cache_dir, INDEX))
    return index


def read_index(cache_dir: str) -> dict[str, Any]:
    path = os.path.join(cache_dir, INDEX)
    if not os.path.isfile(path):
        old = os.path.isfile(os.path.join(cache_dir, "meta.json"))
        raise CacheError(
            f"--teacher-cache {cache_dir!r} has no {INDEX}: "
            + ("an old one-file-per-image cache; rebuild it with tools/cache_teacher.py" if old
               else "not a teacher cache (or its writing never finished)"))
    with open(path, encoding="utf-8") as f:
        try:
            index = json.load(f)
        except ValueError as e:
            raise CacheError(f"--teacher-cache {cache_dir!r}: {INDEX} is not JSON ({e})") from e
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise CacheError(f"--teacher-cache {cache_dir!r}: format "
                         f"{index.get('format') if isinstance(index, dict) else None!r}, "
                         f"this code reads {FORMAT!r}")
    _check_part_entries(cache_dir, index)
    return index


def _check_part_entries(cache_dir: str, index: dict[str, Any]) -> None:
    """Every part is a plain file name inside ``cache_dir`` with a row count: an index entry
    ``"file": "../other_cache/part.bin"`` (or a link out of the folder) is refused."""
    parts, keys = index.get("parts"), index.get("keys")
    if not isinstance(parts, list) or not isinstance(keys, list) or len(parts) != len(keys):
        raise CacheError(f"--teacher-cache {cache_dir!r}: {INDEX} needs as many 'parts' as "
                         f"'keys' lists")
    root = os.path.realpath(cache_dir)
    for p in parts:
        name = p.get("file") if isinstance(p, dict) else None
        ok = (isinstance(name, str) and name and name == os.path.basename(name)
              and "\\" not in name and not name.startswith(".")
              and isinstance(p.get("count"), int) and p["count"] >= 0)
        if ok:
            ok = os.path.dirname(os.path.realpath(os.path.join(cache_dir, name))) == root
        if not ok:
            raise CacheError(f"--teacher-cache {cache_dir!r}: {INDEX} names a part "
                             f"{str(p)[:80]} that is not a file of this folder with a row "
                             f"count: refused (a cache reads only its own parts)")


def _stat_key(path: str) -> list[int]:
    st = os.stat(path)
    return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def verify_parts(cache_dir: str, index: dict[str, Any] | None = None) -> int:
    """Check every part's size and sha256 against the index (``CacheError`` naming the part);
    returns the bytes hashed. A part whose (inode, size, mtime, ctime) matches a previous
    successful check (``.verified.json``) is not read again: a 440 GB cache costs its read
    once, and a part copied or rewritten since has a new ctime and is checked again."""
    index = index if index is not None else read_index(cache_dir)
    stamp_path = os.path.join(cache_dir, VERIFIED)
    try:
        with open(stamp_path, encoding="utf-8") as f:
            stamps = json.load(f)
        stamps = stamps if isinstance(stamps, dict) else {}
    except (OSError, ValueError):
        stamps = {}
    hashed, changed = 0, False
    for part in index["parts"]:
        path = os.path.join(cache_dir, part["file"])
        if "sha256" not in part or "bytes" not in part:
            raise CacheError(f"--teacher-cache {cache_dir!r} was made before parts carried "
                             f"checksums: run blsam-cache-teacher again with the same options "
                             f"and --output (it adds them without encoding anything again)")
        try:
            key = _stat_key(path)
        except OSError as e:
            raise CacheError(f"teacher cache part {path!r}: {e.strerror or e}") from None
        if key[1] != part["bytes"]:
            raise CacheError(f"teacher cache part {path!r} is {key[1]} bytes, the index says "
                             f"{part['bytes']}: damaged or from another cache")
        if stamps.get(part["file"]) == [*key, part["sha256"]]:
            continue
        sha = file_sha256(path)
        hashed += key[1]
        if sha != part["sha256"]:
            raise CacheError(f"teacher cache part {path!r} has sha256 {sha[:16]}..., the index "
                             f"says {part['sha256'][:16]}...: a part of another cache, or "
                             f"damaged; rebuild it with blsam-cache-teacher")
        stamps[part["file"]], changed = [*key, sha], True
    if changed:
        try:
            write_json_atomic(stamps, stamp_path)
        except OSError:  # a read-only cache: checked again next time
            pass
    return hashed


def check_provenance(cache_dir: str, meta: dict[str, Any]) -> dict[str, Any]:
    """Refuse a cache whose teacher checkpoint hash, variant or img_size differ from ``meta``."""
    index = read_index(cache_dir)
    bad = _mismatch(f"--teacher-cache {cache_dir!r}", index, meta)
    if bad:
        raise CacheError(bad + " (rebuild it with tools/cache_teacher.py, or pass the "
                         "--sam-checkpoint / --img-size it was made with)")
    verify_parts(cache_dir, index)
    return index


class PackedCache:
    """Reader: ``get(key)`` copies one fp16 row out of a memory-mapped part (None if absent).

    Part sizes are checked against what the index claims when opened. The maps are opened
    lazily and dropped when pickled, so each DataLoader worker maps the files itself.
    """

    def __init__(self, cache_dir: str) -> None:
        self.dir = cache_dir
        self.index = read_index(cache_dir)
        self.shape = tuple(int(v) for v in self.index["shape"])
        self.where: dict[str, tuple[int, int]] = {}
        for p, keys in enumerate(self.index["keys"]):
            if len(keys) != self.index["parts"][p]["count"]:
                raise CacheError(f"{cache_dir!r}: part {p} lists {len(keys)} keys, "
                                 f"index says {self.index['parts'][p]['count']}")
            for row, k in enumerate(keys):
                self.where[k] = (p, row)
        self._maps: dict[int, np.memmap] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": {}}

    def __len__(self) -> int:
        return len(self.where)

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def covers(self, keys: Iterable[str]) -> bool:
        return all(k in self.where for k in keys)

    def _map(self, p: int) -> np.memmap:
        if p not in self._maps:
            part = self.index["parts"][p]
            path = os.path.join(self.dir, part["file"])
            count = int(part["count"])
            want = count * int(np.prod(self.shape)) * np.dtype(DTYPE).itemsize
            size = os.path.getsize(path)
            if size != want:
                raise CacheError(f"{path!r} is {size} bytes; the index claims {count} rows of "
                                 f"{list(self.shape)} fp16 = {want} bytes")
            self._maps[p] = np.memmap(path, dtype=DTYPE, mode="r", shape=(count, *self.shape))
        return self._maps[p]

    def get(self, key: str) -> torch.Tensor | None:
        loc = self.where.get(key)
        if loc is None:
            return None
        return torch.from_numpy(np.array(self._map(loc[0])[loc[1]]))


_READERS: dict[str, PackedCache] = {}


def lookup(cache_dir: str, key: str) -> torch.Tensor | None:
    """The cached embedding of ``key`` (fp16, (256, S/16, S/16)) or None; one reader per
    process and folder, so dataset code needs no extra state."""
    reader = _READERS.get(cache_dir)
    if reader is None:
        reader = _READERS[cache_dir] = PackedCache(cache_dir)
    return reader.get(key)


def forget(cache_dir: str | None = None) -> None:
    """Drop open readers (after a cache folder was rewritten in the same process)."""
    if cache_dir is None:
        _READERS.clear()
    else:
        _READERS.pop(cache_dir, None)
