"""The training run's steps, in parts that read alone: ``train_step`` (one optimizer update),
``validate``, ``run_loop`` and ``finish``. The run's state and its ``setup`` (data, models,
optimizer) are ``blsam.train.run``'s, checkpoints (``save``, ``resume``)
``blsam.train.checkpointer``'s, the logs ``blsam.train.metrics_log``'s;
``blsam.train.trainer.Trainer.fit`` chains them. State that changes while training lives in one
``Run`` object, so a hook (for example an asynchronous checkpoint writer) needs only that
object.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import torch

from ..checkpoint import load_strict, read_state_dict, save_atomic
from ..utils import dist as du
from ..utils.files import write_json_atomic
from . import cluster
from .async_ckpt import AsyncCheckpointWriter
from .checkpointer import resume, save, write_timeout  # noqa: F401  (loop.resume: its parts)
from .cluster import NonFiniteError, step_flags
from .data import SA1BDataset, collate
from .distill import (
    METRIC_KEYS,
    state_checksum,
)
from .failures import check_boundary, raise_agreed
from .loader import endless_loader, normalize_images, unpack_batch
from .metrics_log import LogInterval, MetricsLog, log_window  # noqa: F401  (loop.MetricsLog)
from .pinned import PinnedPool
from .resume import COUNTERS
from .run import Run
from .sampler import EpochBatchSampler
from .timing import PhaseTimer, StepProfiler
from .validation import VAL_KEYS, evaluate

log = logging.getLogger("blsam.train")


# ---------------------------------------------------------------- one step


def batch_stream(ds: SA1BDataset, sampler: EpochBatchSampler, num_workers: int, epoch: int,
                 start_batch: int, pin: bool) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """Endless (epoch, batch index, batch) from a data position; one DataLoader for the run
    (persistent workers); on CUDA batches come packed for one transfer (``unpack_batch``)."""
    yield from endless_loader(ds, sampler, collate, num_workers, epoch, start_batch, pin)


def train_step(run: Run, stream: Iterator, win: LogInterval) -> float:
    """``accum_steps`` micro-batches, one optimizer update; returns the LR it used."""
    if run.ckpt_writer is not None:  # a failed background write ends every rank at this step
        with run.failures.guard("background checkpoint write"):
            run.ckpt_writer.check()
    loss_bad = _accumulate(run, stream, win)
    return _update(run, loss_bad)


def _accumulate(run: Run, stream: Iterator, win: LogInterval) -> torch.Tensor:
    """Forward and backward of ``accum_steps`` micro-batches (DDP syncs on the last); returns
    whether any loss was non-finite (a device flag: no host sync here)."""
    cfg, dev, timer = run.cfg, run.dev, run.timer
    loss_bad = torch.zeros((), dtype=torch.bool, device=dev)
    for micro in range(cfg.optim.accum_steps):
        epoch, b, batch = next(stream)
        batch = unpack_batch(batch, dev, run.batch_pool)  # one non-blocking copy (CUDA)
        timer.lap("data")
        run.epoch, run.batch_in_epoch = ((epoch, b + 1) if b + 1 < run.batches_per_epoch
                                         else (epoch + 1, 0))
        run.counters["skipped_read"] += len(batch["skipped"])
        run.counters["bad_ann"] += batch["bad_ann"]
        run.counters["large_ann"] += batch["large_ann"]
        images = normalize_images(batch["image"].to(dev, non_blocking=True), batch["hw"])
        t_emb = run.teacher.embeddings(images, batch["teacher"])
        timer.lap("teacher")
        sync = (contextlib.nullcontext() if micro == cfg.optim.accum_steps - 1
                or not run.info.distributed else run.ddp.no_sync())
        with sync:
            with torch.autocast(dev.type, dtype=run.dtype or torch.float32,
                                enabled=run.dtype is not None):
                out = run.ddp(images, batch, t_emb)
            timer.lap("forward")
            loss = out["loss"] / cfg.optim.accum_steps
            loss_bad |= ~torch.isfinite(out["loss"].detach())
            (run.scaler.scale(loss) if run.scaler else loss).backward()
        timer.lap("backward")
        win.dev_sums += torch.stack([out[k].detach().double() for k in METRIC_KEYS])
        win.images += images.shape[0]
        win.micro += 1
        run.images_seen += images.shape[0] * run.info.world_size
    return loss_bad


def _update(run: Run, loss_bad: torch.Tensor) -> float:
    """The optimizer update every rank agrees to take or skip (non-finite loss or gradient
    norm, a stop request, a rank-local failure); returns the LR it used."""
    cfg, dev, timer = run.cfg, run.dev, run.timer
    if run.scaler:
        run.scaler.unscale_(run.opt)
    params = [p for p in run.sam.parameters() if p.grad is not None]
    norm = (torch.nn.utils.get_total_norm([p.grad for p in params]) if params
            else torch.zeros((), device=dev))
    # fp16: GradScaler skips a step with an inf/NaN gradient and lowers its scale; the guard
    # counts that skip too, so a persistent NaN stops the run (exit 3) as it does in bf16
    grad_bad = ~torch.isfinite(norm)
    # every rank takes the same decision: one 3-value all-reduce, one host sync per step
    bad_loss, bad_grad, stop, failed = step_flags(
        loss_bad, grad_bad, run.signals is not None and run.signals.requested is not None,
        run.info.distributed, run.failures.failed)
    if failed:  # some rank's rank-local work failed: every rank raises its message now
        raise_agreed(run.failures, run.info.distributed)
    skip = bad_loss or bad_grad
    if not skip:
        if cfg.optim.clip_grad > 0:
            torch.nn.utils.clip_grads_with_norm_(params, cfg.optim.clip_grad, norm)
        (run.scaler.step(run.opt) if run.scaler else run.opt.step())
    if run.scaler:
        run.scaler.update()  # found_inf was recorded by unscale_
    run.opt.zero_grad(set_to_none=True)
    lr = run.sched.get_last_lr()[0]
    run.sched.step()  # the schedule and data position move on: a skip changes nothing else
    run.step += 1
    if skip:
        _nonfinite(run, "loss" if bad_loss else "gradient norm" + (
            f" (fp16 loss scale now {run.scaler.get_scale():g})" if run.scaler else ""))
    else:
        run.nonfinite_run = 0
    if stop and run.preempted is None:
        run.preempted = (run.signals.requested if run.signals is not None
                         and run.signals.requested else "a signal on another rank")
    timer.lap("optimizer")
    return lr


def _nonfinite(run: Run, what: str) -> None:
    run.nonfinite_steps += 1
    run.nonfinite_run += 1
    limit = run.cfg.cluster.max_nonfinite_steps
    if run.info.is_main:
        log.warning("step %d: non-finite %s: optimizer step skipped on every rank (%d in a "
                    "row, %d in this run)", run.step, what, run.nonfinite_run,
                    run.nonfinite_steps)
    if limit and run.nonfinite_run >= limit:
        raise NonFiniteError(
            f"step {run.step}: {run.nonfinite_run} consecutive steps with a non-finite {what} "
            f"(--max-nonfinite-steps {limit}): stopping; newest good checkpoint: "
            f"{run.last_good or 'none (no checkpoint written yet)'}")



# ---------------------------------------------------------------- validation


def validate(run: Run, mlog: MetricsLog | None) -> dict[str, Any]:
    res = evaluate(run.sam, run.head, run.teacher, run.val_loader, run.dev, run.dtype,
                   run.cfg.optim.fd_padding)
    rec = {"step": run.step, **res, "time": time.time()}
    run.val_history.append(rec)
    if mlog is not None:
        mlog.write("val", rec, VAL_KEYS)
    if run.info.is_main:
        log.info("validation at step %d: %s", run.step,
                 ", ".join(f"{k} {res[k]:.4f}" for k in VAL_KEYS))
    return rec


# ---------------------------------------------------------------- the loop


def run_loop(run: Run, mlog: MetricsLog) -> bool:
    """Steps until ``total`` (True) or ``--stop-after`` (False; the checkpoint is written)."""
    cfg = run.cfg
    stream = batch_stream(run.ds, run.sampler, cfg.data.num_workers, run.epoch, run.batch_in_epoch,
                          pin=run.dev.type == "cuda")
    win = LogInterval(run.dev)
    if run.val_loader is not None and run.step == 0:
        validate(run, mlog)  # the curve's starting point
    run.timer = timer = PhaseTimer(run.dev)
    run.batch_pool = PinnedPool() if run.dev.type == "cuda" else None
    mode = cfg.ckpt.async_checkpoint
    run.ckpt_writer = AsyncCheckpointWriter(
        background=mode == "on" or (mode == "auto" and run.dev.type == "cuda"))
    # a profiler trace on global rank 0 only
    prof = StepProfiler(cfg.log.profile if run.info.is_main else 0, cfg.ckpt.output_dir,
                        run.info.rank, run.dev)
    try:
        done = _steps(run, mlog, stream, win, timer, prof)
    except BaseException:
        with run.failures.guard("profiler trace export"):
            prof.stop()
        with run.failures.guard("background checkpoint write"):
            run.ckpt_writer.wait()  # logged here: the error being raised ends the run
        raise
    with run.failures.guard("profiler trace export"):
        prof.stop()
    check_boundary(run.failures, run.info.distributed, run.dev)  # after the last step
    # the last background write, before finish()'s collective: the others wait for it outside
    # any collective
    with du.main_writes("the last checkpoint", write_timeout(cfg)):
        run.ckpt_writer.release()  # waits: a failed background write is raised here
    if run.batch_pool is not None:  # no copy out of the staging buffers may be in flight
        du.synchronize(run.dev)
        run.batch_pool.release()
    return done


def _steps(run: Run, mlog: MetricsLog, stream: Iterator, win: LogInterval, timer: PhaseTimer,
           prof: StepProfiler) -> bool:
    cfg = run.cfg
    while run.step < run.total:
        lr = train_step(run, stream, win)
        with run.failures.guard("profiler trace export"):
            prof.step()
        step = run.step
        if step % cfg.log.log_every == 0 or step == run.total:
            log_window(run, win, mlog, lr)
        if mlog.bar is not None:
            mlog.bar.update(1)
        if run.val_loader is not None and (step % cfg.val.val_every == 0 or step == run.total):
            validate(run, mlog)
            if run.signals is not None and run.preempted is None:  # a signal meanwhile: stop
                run.preempted = cluster.agreed_stop(run.signals, run.dev, run.info.distributed)
        timer.lap("validation")
        stop_now = ((cfg.ckpt.stop_after is not None and cfg.ckpt.stop_after <= step < run.total)
                    or (run.preempted is not None and step < run.total))
        if step % cfg.ckpt.save_every == 0 or step == run.total or stop_now:
            save(run, step % cfg.ckpt.save_every == 0)
        timer.lap("checkpoint")
        if stop_now:
            return False
    return True


def finish(run: Run, completed: bool) -> dict[str, Any]:
    """Final weights and summary.json; checks every rank ended with the same weights."""
    cfg, info = run.cfg, run.info
    base = {"steps": run.step, "history": run.history, "val_history": run.val_history,
            "selection": run.selection, "data_counts": data_counts(run)}
    base["nonfinite_steps"] = run.nonfinite_steps
    if not completed:
        if info.is_main:
            log.info("stopped after step %d of %d (%s): checkpoint %s; resume with --resume "
                     "auto", run.step, run.total,
                     run.preempted or "--stop-after", os.path.join(cfg.ckpt.output_dir, "last.pth"))
        return {**base, "stopped": True, "preempted": run.preempted}
    checksum = state_checksum(run.sam.state_dict())
    checksums = du.all_gather_objects(checksum)
    summary = {**base, "world_size": info.world_size, "checksums": checksums,
               "ranks_in_sync": len(set(checksums)) == 1,
               "teacher_images_computed": run.teacher.images_computed,
               "teacher_built": run.teacher.encoder is not None, "run": run.signature,
               "dist_timeout_min": cfg.cluster.dist_timeout,
               "write_timeout_min": write_timeout(cfg),
               "amp_dtype": str(run.dtype or torch.float32).replace("torch.", ""),
               "deterministic": cfg.cluster.deterministic}
    # rank 0 writes, the others wait outside any collective (no barrier: the write may outlast
    # --dist-timeout); every rank returns once final.pth and summary.json are on disk
    with du.main_writes("final.pth and summary.json", write_timeout(cfg)) as main:
        if main:
            save_atomic(run.sam.state_dict(), os.path.join(cfg.ckpt.output_dir, "final.pth"))
            write_json_atomic({k: v for k, v in summary.items()
                               if k not in ("history", "val_history")},
                              os.path.join(cfg.ckpt.output_dir, "summary.json"), indent=1)
    if not summary["ranks_in_sync"]:
        raise RuntimeError(f"ranks ended with different weights: {checksums}")
    return summary


def data_counts(run: Run) -> dict[str, Any]:
    """Items skipped while indexing and (every rank's, as last logged) while reading, bad and
    too-large annotations; for a mixture, the samples each member gave up to now (logged)."""
    out: dict[str, Any] = {"skipped_index": len(run.index_skipped)}
    if run.history:
        out.update({k: run.history[-1][k] for k in COUNTERS})
    seen = getattr(run.sampler, "seen", None)
    if seen is not None:
        counts = seen(run.epoch, run.batch_in_epoch)
        names = [m["name"] for m in run.selection["sources"]]
        out["samples_by_source"] = dict(zip(names, counts))
        if run.info.is_main:
            log.info("mixture: samples seen by source: %s", ", ".join(
                f"{n} {c} ({100 * c / max(sum(counts), 1):.1f}%)" for n, c in zip(names, counts)))
    return out


def val_only(run: Run) -> dict[str, Any]:
    """``--val-only --checkpoint X``: load X into the student (strict), validate, report."""
    path = run.cfg.val.checkpoint
    load_strict(run.sam, read_state_dict(path, "--checkpoint"), f"--checkpoint {path!r}")
    rec = validate(run, None)
    out = {"checkpoint": path, **rec, "run": run.signature}
    if run.info.is_main and run.cfg.ckpt.output_dir:
        try:  # the result is returned (and printed) even when the folder fails
            os.makedirs(run.cfg.ckpt.output_dir, exist_ok=True)
            write_json_atomic(out, os.path.join(run.cfg.ckpt.output_dir, "val_only.json"), indent=1)
        except OSError as e:
            log.error("could not write %s/val_only.json (%s): the result is printed only",
                      run.cfg.ckpt.output_dir, e)
    return out
