"""A run's checkpoints: the state dicts of its stateful parts (student, optimizer, schedule,
fp16 loss scaler) plus the data position, counters, RNG and run signature; ``save`` writes them
(every rank checks the weights, rank 0 writes, possibly in a background thread) and ``resume``
restores them, exactly or remapped by images seen (``blsam.train.resume`` decides which).
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..utils import dist as du
from . import rundir
from .cluster import NonFiniteError, first_nonfinite
from .distill import lr_lambda
from .preemption import grace_seconds, note_write
from .resume import (
    COUNTERS,
    clean_stale_temp_files,
    remap_position,
    restore_counters,
    rng_state,
    save_training_checkpoint,
    set_rng_state,
    truncate_jsonl,
)

if TYPE_CHECKING:
    from .config import TrainConfig
    from .run import Run

log = logging.getLogger("blsam.train")


def stateful_parts(run: Run) -> dict[str, Any]:
    """What ``state_dict()`` / ``load_state_dict()`` carry over, by checkpoint key (the fp16
    loss scaler is None when no scaler is used)."""
    return {"model": run.sam, "optimizer": run.opt, "scheduler": run.sched,
            "scaler": run.scaler}


def load_parts(run: Run, ck: dict[str, Any], skip: Sequence[str] = ()) -> None:
    """Load every stateful part but ``skip`` from the checkpoint; the fp16 scaler only when
    both the run and the checkpoint have one."""
    for name, part in stateful_parts(run).items():
        if name in skip or part is None or (name == "scaler" and not ck.get(name)):
            continue
        part.load_state_dict(ck[name])


def checkpoint_state(run: Run, counters: dict[str, list[int]]) -> dict[str, Any]:
    return {
        **{name: part.state_dict() if part is not None else None
           for name, part in stateful_parts(run).items()},
        "step": run.step, "total_steps": run.total, "epoch": run.epoch,
        "batch_in_epoch": run.batch_in_epoch, "batches_per_epoch": run.batches_per_epoch,
        "images_seen": run.images_seen, "counters": counters,
        "skipped_read": sum(counters["skipped_read"]),
        "rng": rng_state(), "config": run.cfg.options(), "run": run.signature,
        "nonfinite_steps": run.nonfinite_steps,
        "amp_dtype": str(run.dtype or torch.float32).replace("torch.", ""),  # what auto chose
    }


def write_timeout(cfg: TrainConfig) -> float:
    """Minutes the other ranks wait for rank 0's file writes (``--write-timeout``)."""
    return float(cfg.cluster.write_timeout or 120.0)


def save(run: Run, numbered: bool) -> None:
    """Every rank's counters gathered (a collective), rank 0 snapshots the state off the device
    and a background thread writes it (atomic rename, last good file kept); the loop times it
    as the "checkpoint" phase, which is not training time. The other ranks wait for rank 0
    outside any collective (``du.main_writes``), so a write longer than ``--dist-timeout``
    does not end the run."""
    # every rank holds the same weights: each checks them, so all stop together
    bad = first_nonfinite({"model": run.sam.state_dict(), "optimizer": run.opt.state_dict()})
    if bad:
        raise NonFiniteError(f"step {run.step}: {bad} is not finite: no checkpoint written; "
                             f"newest good checkpoint: {run.last_good or 'none'}")
    gathered = du.all_gather_objects(dict(run.counters))
    counters = {k: [int(c[k]) for c in gathered] for k in COUNTERS}
    # no collective waits on rank 0's write (it may outlast --dist-timeout): the others wait
    # for it through the store, up to --write-timeout
    with du.main_writes(f"checkpoint step {run.step}", write_timeout(run.cfg)) as main:
        if main:
            run.ckpt_writer.save(_timed_write(run), checkpoint_state(run, counters),
                                 run.cfg.ckpt.output_dir, run.step, numbered,
                                 run.cfg.ckpt.keep_last)
    out = run.cfg.ckpt.output_dir
    run.last_good = os.path.join(out, f"step_{run.step:07d}.pth" if numbered else "last.pth")



def _timed_write(run: Run) -> Callable[..., None]:
    """``save_training_checkpoint`` timed from the snapshot to the renamed file: the number the
    preemption grace must cover (``blsam.train.preemption``)."""
    t0, step = time.monotonic(), run.step
    grace = grace_seconds(run.cfg.cluster.preempt_grace)

    def write(state: dict[str, Any], out: str, *args: Any) -> None:
        save_training_checkpoint(state, out, *args)
        size = os.path.getsize(os.path.join(out, "last.pth"))
        note_write(out, step, time.monotonic() - t0, size, grace)

    return write


def resume(run: Run) -> None:
    """Continue from ``--resume``: exactly when the run's signature matches the checkpoint's,
    by images seen with ``--resume-remap``, refused otherwise. Also cleans stale temp files and
    the log lines the checkpoint does not cover."""
    cfg, info = run.cfg, run.info
    if info.is_main:
        os.makedirs(cfg.ckpt.output_dir, exist_ok=True)
        clean_stale_temp_files(cfg.ckpt.output_dir)
    path, ck, diffs = run.resume_path, run.resume_ck, run.resume_diffs
    if not path:
        if info.is_main:
            if cfg.ckpt.resume:
                log.info("--resume %s: no checkpoint in %s, starting fresh", cfg.ckpt.resume,
                         cfg.ckpt.output_dir)
            elif os.path.isfile(os.path.join(cfg.ckpt.output_dir, "last.pth")):
                log.warning("%s holds a checkpoint but --resume was not given: starting from "
                            "scratch and overwriting it", cfg.ckpt.output_dir)
            for name in ("metrics.jsonl", "val.jsonl"):  # a fresh log
                truncate_jsonl(os.path.join(cfg.ckpt.output_dir, name), 0)
            rundir.start_rotation(cfg.ckpt.output_dir, None)  # keep-last prunes this run's files
        return
    # an exact resume restores every stateful part; a remapped one all but the schedule
    load_parts(run, ck, skip=("scheduler",) if diffs else ())
    if not diffs:
        run.step, run.epoch, run.batch_in_epoch = ck["step"], ck["epoch"], ck["batch_in_epoch"]
        run.images_seen = int(ck.get("images_seen", run.step * run.global_batch))
        set_rng_state(ck["rng"])
    else:
        pos = remap_position(ck, run.global_batch, run.batches_per_epoch)
        run.step, run.epoch, run.batch_in_epoch = pos["step"], pos["epoch"], pos["batch_in_epoch"]
        run.images_seen = pos["images_seen"]
        f = lr_lambda(cfg.optim.warmup_steps, run.total, cfg.optim.min_lr_ratio)
        for g in run.opt.param_groups:  # the new schedule at the new step, from --lr
            g["initial_lr"] = cfg.optim.lr
            g["lr"] = cfg.optim.lr * f(run.step)
        sched = run.sched.state_dict()  # the schedule moved by its public state dict
        sched.update(base_lrs=[cfg.optim.lr] * len(run.opt.param_groups), last_epoch=run.step,
                     _last_lr=[g["lr"] for g in run.opt.param_groups])
        run.sched.load_state_dict(sched)
        if info.is_main:
            log.warning("--resume-remap: %s was written by another run geometry (%s); "
                        "continuing by images seen (%d): step %d -> %d, data position epoch %d "
                        "batch %d. This is NOT the run the checkpoint started.", path,
                        "; ".join(diffs), run.images_seen, ck["step"], run.step, run.epoch,
                        run.batch_in_epoch)
    run.counters = restore_counters(ck, info.rank, info.world_size, exact=not diffs)
    run.nonfinite_steps = int(ck.get("nonfinite_steps", 0))
    run.resumed_from = run.last_good = path
    run.resume_ck = None  # free the checkpoint's memory
    if info.is_main:
        log.info("resumed from %s at step %d (epoch %d, batch %d)", path, run.step, run.epoch,
                 run.batch_in_epoch)
        for name in ("metrics.jsonl", "val.jsonl"):
            truncate_jsonl(os.path.join(cfg.ckpt.output_dir, name), run.step)
        rundir.start_rotation(cfg.ckpt.output_dir, run.step)
