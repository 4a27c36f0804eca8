"""The training run in parts that read alone: ``setup`` (data, models, optimizer),
``train_step`` (one optimizer update), ``validate``, ``run_loop`` and ``finish``; checkpoints
(``save``, ``resume``) are ``blsam.train.checkpointer``'s, the logs
``blsam.train.metrics_log``'s; ``blsam.train.trainer.Trainer.fit`` chains them. State that
changes while training lives in one ``Run`` object, so a hook (for example an asynchronous
checkpoint writer) needs only that object.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..build_blsam import blsam_model_registry, reinit_image_encoder_
from ..checkpoint import load_strict, read_state_dict, save_atomic
from ..specs import TEACHER_OF
from ..utils import dist as du
from ..utils.collectives import fail_together
from ..utils.files import file_sha256, write_json_atomic
from . import cluster, rundir
from .async_ckpt import AsyncCheckpointWriter
from .checkpointer import resume, save, write_timeout  # noqa: F401  (loop.resume: its parts)
from .cluster import NonFiniteError, StopSignals, cache_key, check_ranks_agree, step_flags
from .config import TrainConfig
from .data import SA1BDataset, collate
from .distill import (
    METRIC_KEYS,
    DistillModel,
    enable_grad_checkpointing,
    lr_lambda,
    make_optimizer,
    set_trainable,
    state_checksum,
)
from .failures import LocalFailures, check_boundary, raise_agreed
from .loader import endless_loader, normalize_images, unpack_batch
from .metrics_log import LogInterval, MetricsLog, log_window  # noqa: F401  (loop.MetricsLog)
from .pinned import PinnedPool
from .precision import amp_dtype
from .resume import COUNTERS, check_resume, load_resume, run_signature, saved_signature
from .sampler import EpochBatchSampler
from .sources.build import signature_extras, training_data
from .teacher import Teacher, cache_covers
from .timing import PhaseTimer, StepProfiler
from .validation import VAL_KEYS, PromptHead, evaluate

log = logging.getLogger("blsam.train")


@dataclass
class Run:
    """Everything a training run holds; the loop's parts read and update it."""

    cfg: TrainConfig
    info: du.DistInfo
    dtype: torch.dtype | None
    records: list
    index_skipped: list[str]
    selection: dict[str, Any]
    ds: SA1BDataset
    sampler: EpochBatchSampler
    total: int
    sam: nn.Module
    parts: list[str]
    teacher: Teacher
    head: PromptHead
    model: DistillModel
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None
    signature: dict[str, Any]
    val_loader: Any | None = None
    ddp: nn.Module | None = None
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    images_seen: int = 0
    resumed_from: str | None = None
    resume_path: str | None = None  # checked in setup, loaded by resume()
    resume_ck: dict[str, Any] | None = None
    resume_diffs: list[str] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=lambda: {k: 0 for k in COUNTERS})
    history: list[dict[str, Any]] = field(default_factory=list)
    val_history: list[dict[str, Any]] = field(default_factory=list)
    timer: PhaseTimer | None = None  # per-phase laps, from run_loop on
    ckpt_writer: AsyncCheckpointWriter | None = None  # set by run_loop
    nonfinite_steps: int = 0  # optimizer steps skipped for a non-finite loss / grad norm
    nonfinite_run: int = 0  # ... of them in a row, up to now
    last_good: str | None = None  # the newest checkpoint known finite (written or resumed)
    signals: StopSignals | None = None  # set by Trainer.fit: preemption requests
    batch_pool: PinnedPool | None = None  # exact-size pinned staging of batches (CUDA)
    preempted: str | None = None  # the signal the run stopped for
    failures: LocalFailures = field(default_factory=LocalFailures)  # rank-local work's errors

    @property
    def dev(self) -> torch.device:
        return self.info.device

    @property
    def batches_per_epoch(self) -> int:
        return len(self.sampler)

    @property
    def global_batch(self) -> int:
        o = self.cfg.optim
        return self.info.world_size * o.batch_size * o.accum_steps



# ---------------------------------------------------------------- setup


def total_steps(cfg: TrainConfig, batches_per_epoch: int) -> int:
    o = cfg.optim
    return o.max_steps or max(1, int(o.epochs * batches_per_epoch) // o.accum_steps)


def setup(cfg: TrainConfig) -> Run:
    """Data first (a bad --data fails before any model is built), then the student (P-blocks
    from SAM), a frozen copy of SAM's prompt encoder + decoder for validation, the teacher,
    optimizer and schedule."""
    info = du.init_distributed(cfg.cluster.device, timeout_min=cfg.cluster.dist_timeout)
    dev = info.device
    teacher_name = TEACHER_OF[cfg.model.model]
    with fail_together(announce=False):  # a rank whose data or resume file fails: every rank
        d = _setup_data(cfg, info, teacher_name)
    records, ds, sampler, total, signature = d.records, d.ds, d.sampler, d.total, d.signature
    resume_path, resume_ck = d.resume_path, d.resume_ck
    # every rank describes the same run, or all stop here naming the difference (never train
    # on different data, never wait in a collective another rank will not reach)
    check_ranks_agree({
        "run signature": {k: v for k, v in signature.items() if k not in ("images",
                                                                           "images_sha")},
        "images": len(ds), "images_sha": signature["images_sha"],
        "batches per epoch": len(sampler), "total steps": total,
        "resume file": resume_path and os.path.abspath(resume_path),
        "resume step": resume_ck["step"] if resume_ck else None,
        "teacher cache": cache_key(cfg.data.teacher_cache)})

    torch.manual_seed(cfg.data.seed)
    np.random.seed(cfg.data.seed)
    random.seed(cfg.data.seed)
    sam = blsam_model_registry[cfg.model.model](
        sam_checkpoint=cfg.model.sam_checkpoint, keep_ratio=cfg.model.keep_ratio,
        img_size=cfg.model.img_size)
    head = PromptHead(copy.deepcopy(sam.prompt_encoder), copy.deepcopy(sam.mask_decoder))
    head.to(dev)
    if cfg.model.init == "random":  # the student's encoder only: head and teacher stay SAM
        reinit_image_encoder_(sam, cfg.model.model, cfg.model.keep_ratio, cfg.model.img_size)
    if cfg.model.init_checkpoint:  # the student only: head and teacher stay SAM
        load_strict(sam, read_state_dict(cfg.model.init_checkpoint, "--init-checkpoint"),
                    f"--init-checkpoint {cfg.model.init_checkpoint!r}")
    parts = set_trainable(sam, cfg.model.trainable)
    sam.to(dev).train()
    if cfg.model.grad_checkpoint:
        enable_grad_checkpointing(sam.image_encoder)
    dtype = amp_dtype(cfg.optim.amp, dev)
    teacher = Teacher(teacher_name, cfg.model.sam_checkpoint, cfg.model.img_size, dev, dtype,
                      compile=cfg.data.teacher_compile)
    if cfg.val.val_only:
        pass  # the teacher is built on first use, if the cache lacks a validation image
    elif not cache_covers(cfg.data.teacher_cache, [r.key for r in records]):
        teacher.build()
    elif info.is_main:
        log.info("teacher cache covers every image: no teacher model built")

    model = DistillModel(sam, cfg.optim.lambda_fd, cfg.data.prompt_iters, cfg.optim.fd_padding)
    opt = make_optimizer(sam, cfg.optim)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda(cfg.optim.warmup_steps, total, cfg.optim.min_lr_ratio))
    scaler = torch.amp.GradScaler(dev.type) if dtype == torch.float16 else None
    return Run(cfg=cfg, info=info, dtype=dtype, records=records, index_skipped=d.index_skipped,
               selection=d.selection, ds=ds, sampler=sampler, total=total, sam=sam, parts=parts,
               teacher=teacher, head=head, model=model, opt=opt, sched=sched, scaler=scaler,
               signature=signature, val_loader=d.val_loader, resume_path=resume_path,
               resume_ck=resume_ck, resume_diffs=d.resume_diffs)


@dataclass
class RunData:
    """What ``_setup_data`` found: the data, the step count, the signature and the checked
    resume file (loaded by ``checkpointer.resume``)."""

    records: list
    index_skipped: list[str]
    selection: dict[str, Any]
    ds: SA1BDataset
    sampler: EpochBatchSampler
    total: int
    val_loader: Any | None
    signature: dict[str, Any]
    resume_path: str | None
    resume_ck: dict[str, Any] | None
    resume_diffs: list[str]


def _setup_data(cfg: TrainConfig, info: du.DistInfo, teacher_name: str) -> RunData:
    """The source (``sources.build``), validation loader, step count and run signature; a
    checkpoint of another run is refused here, before any model is built."""
    data = training_data(cfg, info.rank, info.world_size, teacher_name)
    src, ds, sampler = data.source, data.ds, data.sampler
    total = total_steps(cfg, len(sampler))
    val_loader = None
    if data.val_ds is not None:
        val_loader = torch.utils.data.DataLoader(
            data.val_ds, batch_size=cfg.optim.batch_size, collate_fn=collate, num_workers=0,
            sampler=[(0, i) for i in range(len(data.val_ds))])
    if info.is_main:
        log.info("%d images (%d damaged items skipped while indexing), %d batches/epoch/rank, "
                 "%d steps, world size %d", len(ds), len(src.skipped), len(sampler), total,
                 info.world_size)
    signature = run_signature(cfg.options(), info.world_size, total, [r.key for r in data.records])
    signature.update(signature_extras(src))
    if cfg.model.init != "sam":  # recorded only when not the default: older runs resume
        signature["init"] = cfg.model.init
    if cfg.model.init_checkpoint:
        signature["init_checkpoint_sha256"] = file_sha256(cfg.model.init_checkpoint)
    resume_path, resume_ck, resume_diffs = None, None, []
    if info.is_main and not cfg.val.val_only:  # issue 27.6: one run owns --output-dir
        rundir.claim(cfg.ckpt.output_dir)
    if not cfg.val.val_only:  # a checkpoint of another run is refused before any model is built
        resume_path, resume_ck = load_resume(cfg.ckpt.resume, cfg.ckpt.output_dir)
        if resume_path:
            resume_diffs = check_resume(resume_path, saved_signature(resume_ck), signature,
                                        cfg.ckpt.resume_remap)
    return RunData(data.records, src.skipped, src.selection, ds, sampler, total, val_loader,
                   signature, resume_path, resume_ck, resume_diffs)



def wrap_ddp(run: Run) -> None:
    if run.info.distributed:
        dev = run.dev
        run.ddp = nn.parallel.DistributedDataParallel(
            run.model, device_ids=[dev.index] if dev.type == "cuda" else None,
            # the prompt encoder has embeddings no prompt kind uses (mask_downscaling, ...)
            find_unused_parameters="prompt_encoder" in run.parts,
            gradient_as_bucket_view=True)  # issue 27.5: no second fp32 copy of the grads
    else:
        run.ddp = run.model



# ---------------------------------------------------------------- one step


def batch_stream(ds: SA1BDataset, sampler: EpochBatchSampler, num_workers: int, epoch: int,
                 start_batch: int, pin: bool) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """Endless (epoch, batch index, batch) from a data position; one DataLoader for the run
    (persistent workers); on CUDA batches come packed for one transfer (``unpack_batch``)."""
    yield from endless_loader(ds, sampler, collate, num_workers, epoch, start_batch, pin)


def train_step(run: Run, stream: Iterator, win: LogInterval) -> float:
    """``accum_steps`` micro-batches, one optimizer update; returns the LR it used."""
    cfg, dev, timer = run.cfg, run.dev, run.timer
    if run.ckpt_writer is not None:  # a failed background write ends every rank at this step
        with run.failures.guard("background checkpoint write"):
            run.ckpt_writer.check()
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
