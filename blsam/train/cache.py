"""Precompute the teacher's image embeddings once (fp16, one ``sa_N.pt`` per image).

Why: the ViT-H teacher costs about as much as the student's forward and backward together;
with no augmentation its output per image never changes, so 10 epochs need it only once.
"""
from __future__ import annotations

import argparse
import logging
import os
from typing import Any, Dict

import torch

from ..build_blsam import TEACHER_OF
from ..checkpoint import save_atomic
from ..utils import dist as du
from .data import SA1BDataset, add_data_args, collate, select_records
from .engine import amp_dtype
from .teacher import Teacher, write_cache_meta

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
    a("--amp", default="auto", choices=("auto", "bf16", "fp16", "none"))
    return p


@torch.no_grad()
def cache_teacher(args: argparse.Namespace) -> Dict[str, Any]:
    """Write missing embeddings (existing files are kept, so an interrupted run continues).
    Under torchrun each rank takes every world_size-th image."""
    info = du.init_distributed(args.device)
    teacher_name = args.teacher or TEACHER_OF[args.model]
    records, skipped = select_records(args.data, args.shards, args.data_fraction, args.seed)
    if info.is_main:
        write_cache_meta(args.output, teacher_name, args.img_size)
    todo = [r for r in records[info.rank::info.world_size]
            if not os.path.isfile(os.path.join(args.output, r.key + ".pt"))]
    ds = SA1BDataset(todo, args.img_size, with_targets=False)
    teacher = Teacher(teacher_name, args.sam_checkpoint, args.img_size, info.device,
                      amp_dtype(args.amp, info.device))
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, collate_fn=collate,
                                         num_workers=args.num_workers)
    written, read_skipped = 0, 0
    for batch in loader:
        read_skipped += len(batch["skipped"])
        emb = teacher.encode(batch["image"]).half().cpu()
        for key, e in zip(batch["key"], emb):
            path = os.path.join(args.output, key + ".pt")
            if not os.path.isfile(path):  # a replaced damaged item may repeat a key
                save_atomic(e.clone(), path)
                written += 1
    du.barrier()
    out = {"images": len(records), "written": written, "skipped_index": len(skipped),
           "skipped_read": read_skipped}
    log.info("teacher cache %s: %s", args.output, out)
    return out
