"""Precompute the teacher's image embeddings once, into a packed cache (``packed_cache.py``).

Why: the ViT-H teacher costs about as much as the student's forward and backward together;
with no augmentation its output per image never changes, so 10 epochs need it only once.
Under torchrun every rank encodes every world_size-th image into its own part file; rank 0
writes the index (with the teacher checkpoint's sha256 and img_size) once all parts are done.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..specs import TEACHER_OF, check_img_size
from ..utils.cli import OptionError, check_option, config_from_options
from ..utils.collectives import DEFAULT_TIMEOUT_MIN
from ..utils.dist import default_store, init_distributed
from .data import add_data_args, collate
from .loader import one_opencv_thread_in_workers
from .packed_cache import (
    CacheError,
    PartWriter,
    finished_part,
    forget,
    provenance,
    read_index,
    remove_stale_temps,
    write_index,
)
from .precision import amp_dtype
from .sources.build import SA1B_IDENTITY, open_source
from .sources.spec import source_spec_of
from .teacher import Teacher

log = logging.getLogger("blsam.train.cache")


def build_parser() -> argparse.ArgumentParser:
    """Data-selection options match tools/train.py, so the same flags pick the same images."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a = p.add_argument
    a("--config", default=None, help="YAML file of option: value defaults")
    add_data_args(p)
    a("--model", default="b_t", choices=sorted(TEACHER_OF), help="student; picks the teacher")
    a("--teacher", default=None, choices=sorted(set(TEACHER_OF.values())),
      help="teacher variant (default: TEACHER_OF[--model])")
    a("--sam-checkpoint", required=True)
    a("--img-size", type=int, default=1024)
    a("--output", required=True, help="cache folder")
    a("--batch-size", type=int, default=8)
    a("--device", default=None)
    a("--amp", default="auto", choices=("auto", "bf16", "fp16", "none"),
      help="teacher autocast on GPU (auto: bf16 where native, compute capability >= "
           "8.0, else fp16); the CPU always runs fp32")
    a("--teacher-compile", action="store_true", help="torch.compile the teacher encoder")
    a("--chunk-images", type=int, default=256,
      help="rows per resumable chunk of a part: a killed run resumes after its last chunk")
    a("--dist-timeout", type=float, default=DEFAULT_TIMEOUT_MIN, metavar="MIN",
      help="torchrun: process-group timeout in minutes, as in blsam-train (recorded in "
           "index.json); no rank waits inside a collective for another rank's part")
    a("--poll-seconds", type=float, default=5.0,
      help="rank 0: how often it looks for the other ranks' finished parts")
    return p


@dataclass
class CacheConfig:
    """``blsam-cache-teacher``'s options (``build_parser`` says what each means)."""

    sam_checkpoint: str
    output: str
    data: str | None = None
    data_format: str = "sa1b"
    ann_file: str | None = None
    img_dir: str | None = None
    mixture: str | None = None
    exif_orientation: str = "ignore"
    shards: list[str] | None = None
    data_fraction: float = 0.02
    seed: int = 0
    num_workers: int = 2
    model: str = "b_t"
    teacher: str | None = None
    img_size: int = 1024
    batch_size: int = 8
    device: str | None = None
    amp: str = "auto"
    teacher_compile: bool = False
    chunk_images: int = 256
    dist_timeout: float = DEFAULT_TIMEOUT_MIN
    poll_seconds: float = 5.0
    config: str | None = None  # the YAML file the defaults came from

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> CacheConfig:
        """From option values by name (``vars()`` of the parsed arguments); an unknown name
        is an ``OptionError``."""
        return config_from_options(cls, options, "cache")

    def check(self) -> None:
        """Refuse values that mean nothing, before any data is indexed or model built."""
        for name in ("batch_size", "chunk_images"):
            if getattr(self, name) < 1:
                raise OptionError(f"--{name.replace('_', '-')} must be >= 1")
        if not self.dist_timeout > 0 or not self.poll_seconds > 0:
            raise OptionError("--dist-timeout and --poll-seconds must be > 0")
        check_option(check_img_size, self.img_size, "--img-size")
        if not os.path.isfile(self.sam_checkpoint):
            raise FileNotFoundError(f"--sam-checkpoint {self.sam_checkpoint!r} does not exist")


def _keys_digest(keys: Any) -> str:
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()


FAILED_KEY = "blsam/cache_teacher/failed"


def wait_for_parts(out_dir: str, world: int, metas: list[dict[str, Any]], poll_s: float
                   ) -> None:
    """Rank 0: wait until every rank's part is finished, by looking at the files (no
    collective, so no process-group timeout while a rank re-encodes its part for an hour); a
    rank that failed publishes its error in the store and ends the wait with it."""
    store = default_store()
    waiting = list(range(world))
    logged = False
    while True:
        waiting = [r for r in waiting if not finished_part(out_dir, r, world, metas[r])]
        if not waiting:
            return
        if store is not None and store.check([FAILED_KEY]):
            raise CacheError(f"teacher cache not finished: {store.get(FAILED_KEY).decode()}")
        if not logged:
            log.info("rank 0: waiting for the parts of rank(s) %s", waiting)
            logged = True
        time.sleep(poll_s)


def cache_teacher(args: CacheConfig) -> dict[str, Any]:
    """Write (or finish) this rank's part, in resumable chunks; then rank 0 waits for every
    part by looking at the files and writes the index. No rank waits in a collective."""
    args.check()
    info = init_distributed(args.device, timeout_min=args.dist_timeout)
    teacher_name = args.teacher or TEACHER_OF[args.model]
    src = open_source(source_spec_of(args), args.seed)
    records, skipped = src.records, src.skipped
    # the source's identity goes into every part and the index: a run reading another source
    # refuses the cache (sources.build.check_cache_source), a part of another source never
    # counts as this one's (its assigned digest covers the identity)
    meta = {**provenance(teacher_name, args.sam_checkpoint, args.img_size),
            "source": src.identity}
    if os.path.isfile(os.path.join(args.output, "index.json")):
        old = read_index(args.output)
        old.setdefault("source", SA1B_IDENTITY)
        diff = [k for k in ("teacher", "teacher_sha256", "img_size", "source")
                if old.get(k) != meta[k]]
        if diff:
            raise CacheError(f"--output {args.output!r} holds a cache made with "
                             + ", ".join(f"{k}={old.get(k)!r}" for k in diff)
                             + "; choose another folder")
    salt = [] if src.identity == SA1B_IDENTITY else [json.dumps(src.identity, sort_keys=True)]
    metas = [{**meta, "assigned_sha256": _keys_digest(
        salt + [r.key for r in records[k::info.world_size]])} for k in range(info.world_size)]
    mine = records[info.rank::info.world_size]
    part_meta = metas[info.rank]
    stale = remove_stale_temps(args.output, info.rank, info.world_size)
    if stale:
        log.info("rank %d: removed %d stale temporary file(s) of dead writers: %s", info.rank,
                 len(stale), stale[:5])
    written, read_skipped, resumed = 0, 0, 0
    try:
        if finished_part(args.output, info.rank, info.world_size, part_meta):
            log.info("rank %d: part already complete, skipping its %d images", info.rank,
                     len(mine))
        else:
            written, read_skipped, resumed = _write_part(args, info, teacher_name, src, mine,
                                                         part_meta)
    except BaseException as e:
        store = default_store()
        if store is not None:
            try:
                store.set(FAILED_KEY, f"rank {info.rank}: {type(e).__name__}: {e}")
            except Exception:
                pass
        raise
    out = {"images": len(records), "written": written, "resumed": resumed,
           "skipped_index": len(skipped), "skipped_read": read_skipped,
           "stale_temps_removed": len(stale), "dist_timeout_min": args.dist_timeout}
    if info.is_main:
        wait_for_parts(args.output, info.world_size, metas, args.poll_seconds)
        index = write_index(args.output, info.world_size, meta)
        out["cached"] = sum(p["count"] for p in index["parts"])
    forget(args.output)
    log.info("teacher cache %s (rank %d): %s", args.output, info.rank, out)
    return out


def _write_part(args: CacheConfig, info: Any, teacher_name: str, src: Any,
                mine: list[Any], part_meta: dict[str, Any]) -> tuple[int, int, int]:
    """Encode what is left of this rank's part; returns (written, read-skipped, resumed)."""
    writer = PartWriter(args.output, info.rank, info.world_size, part_meta, args.chunk_images)
    written = read_skipped = 0
    try:
        seen = set(writer.keys)
        if writer.resumed_rows:
            log.info("rank %d: resuming its part after %d complete rows", info.rank,
                     writer.resumed_rows)
        left = [r for r in mine if r.key not in seen]
        if left:
            ds = src.dataset(left, img_size=args.img_size, with_targets=False)
            teacher = Teacher(teacher_name, args.sam_checkpoint, args.img_size, info.device,
                              amp_dtype(args.amp, info.device), compile=args.teacher_compile)
            loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size,
                                                 collate_fn=collate,
                                                 num_workers=args.num_workers,
                                                 pin_memory=info.device.type == "cuda")
            with one_opencv_thread_in_workers():  # the workers fork here
                batches = iter(loader)
            for batch in batches:
                read_skipped += len(batch["skipped"])
                emb = teacher.encode(batch["image"]).half().cpu()
                for key, e in zip(batch["key"], emb):
                    if key not in seen:  # a replaced damaged item may repeat a key
                        seen.add(key)
                        writer.append(key, e)
                        written += 1
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return written, read_skipped, writer.resumed_rows
