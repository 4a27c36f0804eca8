"""Precompute the teacher's image embeddings once, into a packed cache (``packed_cache.py``).

Why: the ViT-H teacher costs about as much as the student's forward and backward together;
with no augmentation its output per image never changes, so 10 epochs need it only once.
Under torchrun every rank encodes every world_size-th image into its own part file; rank 0
writes the index (with the teacher checkpoint's sha256 and img_size) once all parts are done.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
from typing import Any, Dict

import torch

from ..specs import TEACHER_OF
from ..utils import dist as du
from .data import SA1BDataset, add_data_args, collate, select_records
from .engine import amp_dtype
from .packed_cache import (CacheError, PartWriter, finished_part, forget, provenance,
                           read_index, write_index)
from .teacher import Teacher

log = logging.getLogger("blsam.train.cache")


def build_parser() -> argparse.ArgumentParser:
    """Data-selection options match tools/train.py, so the same flags pick the same images."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a = p.add_argument
    a("--config", default=None, help="YAML file of option: value defaults")
    add_data_args(p, require_data=True)
    a("--model", default="b_t", choices=sorted(TEACHER_OF), help="student; picks the teacher")
    a("--teacher", default=None, choices=sorted(set(TEACHER_OF.values())),
      help="teacher variant (default: TEACHER_OF[--model])")
    a("--sam-checkpoint", required=True)
    a("--img-size", type=int, default=1024)
    a("--output", required=True, help="cache folder")
    a("--batch-size", type=int, default=8)
    a("--device", default=None)
    a("--amp", default="auto", choices=("auto", "bf16", "fp16", "none"),
      help="teacher autocast on GPU (auto: bf16); the CPU always runs fp32")
    a("--teacher-compile", action="store_true", help="torch.compile the teacher encoder")
    return p


def _keys_digest(keys: Any) -> str:
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()


def cache_teacher(args: argparse.Namespace) -> Dict[str, Any]:
    """Write this rank's part (skipped when an earlier run already finished it for the same
    images and teacher), then rank 0 writes the index."""
    for name in ("batch_size",):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.img_size < 16 or args.img_size % 16:
        raise ValueError(f"--img-size must be a positive multiple of 16, got {args.img_size}")
    if not os.path.isfile(args.sam_checkpoint):
        raise FileNotFoundError(f"--sam-checkpoint {args.sam_checkpoint!r} does not exist")
    info = du.init_distributed(args.device)
    teacher_name = args.teacher or TEACHER_OF[args.model]
    records, skipped = select_records(args.data, args.shards, args.data_fraction, args.seed)
    meta = provenance(teacher_name, args.sam_checkpoint, args.img_size)
    if os.path.isfile(os.path.join(args.output, "index.json")):
        old = read_index(args.output)
        diff = [k for k in ("teacher", "teacher_sha256", "img_size") if old.get(k) != meta[k]]
        if diff:
            raise CacheError(f"--output {args.output!r} holds a cache made with "
                             + ", ".join(f"{k}={old.get(k)!r}" for k in diff)
                             + "; choose another folder")
    mine = records[info.rank::info.world_size]
    assigned = _keys_digest([r.key for r in mine])
    part_meta = {**meta, "assigned_sha256": assigned}
    written, read_skipped = 0, 0
    if finished_part(args.output, info.rank, info.world_size, part_meta):
        log.info("rank %d: part already complete, skipping its %d images", info.rank, len(mine))
    else:
        ds = SA1BDataset(mine, args.img_size, with_targets=False)
        teacher = Teacher(teacher_name, args.sam_checkpoint, args.img_size, info.device,
                          amp_dtype(args.amp, info.device), compile=args.teacher_compile)
        loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, collate_fn=collate,
                                             num_workers=args.num_workers,
                                             pin_memory=info.device.type == "cuda")
        writer = PartWriter(args.output, info.rank, info.world_size, part_meta)
        try:
            seen = set()
            for batch in loader:
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
    du.barrier()
    if info.is_main:
        index = write_index(args.output, info.world_size, meta)
        cached = sum(p["count"] for p in index["parts"])
    du.barrier()
    forget(args.output)
    out = {"images": len(records), "written": written, "skipped_index": len(skipped),
           "skipped_read": read_skipped}
    if info.is_main:
        out["cached"] = cached
    log.info("teacher cache %s: %s", args.output, out)
    return out
