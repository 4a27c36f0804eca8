"""A training run's state (``Run``) and how it is built: ``setup`` reads the data first (a bad
--data fails before any model is built), checks the resume file, then builds the student, the
teacher and the optimizer; ``wrap_ddp`` wraps the model for torchrun. ``blsam.train.loop``
steps it, ``blsam.train.checkpointer`` saves and restores it.
"""
from __future__ import annotations

import copy
import logging
import os
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..build_blsam import blsam_model_registry, reinit_image_encoder_
from ..checkpoint import load_strict, read_state_dict
from ..specs import TEACHER_OF
from ..utils import dist as du
from ..utils.collectives import fail_together
from ..utils.files import file_sha256
from . import rundir
from .async_ckpt import AsyncCheckpointWriter
from .checkpointer import resume, save, write_timeout  # noqa: F401  (loop.resume: its parts)
from .cluster import StopSignals, cache_key, check_ranks_agree
from .config import TrainConfig
from .data import SA1BDataset, collate
from .distill import (
    DistillModel,
    enable_grad_checkpointing,
    lr_lambda,
    make_optimizer,
    set_trainable,
)
from .failures import LocalFailures
from .metrics_log import LogInterval, MetricsLog, log_window  # noqa: F401  (loop.MetricsLog)
from .pinned import PinnedPool
from .precision import amp_dtype
from .resume import COUNTERS, check_resume, load_resume, run_signature, saved_signature
from .sampler import EpochBatchSampler
from .sources.build import signature_extras, training_data
from .teacher import Teacher, cache_covers
from .timing import PhaseTimer
from .validation import PromptHead

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
    _check_ranks_describe_one_run(cfg, d)
    sam, head, parts = _build_student(cfg, dev)
    dtype = amp_dtype(cfg.optim.amp, dev)
    teacher = Teacher(teacher_name, cfg.model.sam_checkpoint, cfg.model.img_size, dev, dtype,
                      compile=cfg.data.teacher_compile)
    if cfg.val.val_only:
        pass  # the teacher is built on first use, if the cache lacks a validation image
    elif not cache_covers(cfg.data.teacher_cache, [r.key for r in d.records]):
        teacher.build()
    elif info.is_main:
        log.info("teacher cache covers every image: no teacher model built")

    model = DistillModel(sam, cfg.optim.lambda_fd, cfg.data.prompt_iters, cfg.optim.fd_padding)
    opt = make_optimizer(sam, cfg.optim)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda(cfg.optim.warmup_steps, d.total, cfg.optim.min_lr_ratio))
    scaler = torch.amp.GradScaler(dev.type) if dtype == torch.float16 else None
    return Run(cfg=cfg, info=info, dtype=dtype, records=d.records, index_skipped=d.index_skipped,
               selection=d.selection, ds=d.ds, sampler=d.sampler, total=d.total, sam=sam,
               parts=parts, teacher=teacher, head=head, model=model, opt=opt, sched=sched,
               scaler=scaler, signature=d.signature, val_loader=d.val_loader,
               resume_path=d.resume_path, resume_ck=d.resume_ck, resume_diffs=d.resume_diffs)


def _check_ranks_describe_one_run(cfg: TrainConfig, d: RunData) -> None:
    """Every rank describes the same run, or all stop here naming the difference (never train
    on different data, never wait in a collective another rank will not reach)."""
    check_ranks_agree({
        "run signature": {k: v for k, v in d.signature.items()
                          if k not in ("images", "images_sha")},
        "images": len(d.ds), "images_sha": d.signature["images_sha"],
        "batches per epoch": len(d.sampler), "total steps": d.total,
        "resume file": d.resume_path and os.path.abspath(d.resume_path),
        "resume step": d.resume_ck["step"] if d.resume_ck else None,
        "teacher cache": cache_key(cfg.data.teacher_cache)})


def _build_student(cfg: TrainConfig, dev: torch.device) -> tuple[nn.Module, PromptHead,
                                                                 list[str]]:
    """The seeded student (P-blocks from SAM, or ``--init random``, or ``--init-checkpoint``)
    on ``dev`` in train mode, SAM's frozen prompt head for validation, the trained parts."""
    torch.manual_seed(cfg.data.seed)
    np.random.seed(cfg.data.seed)
    random.seed(cfg.data.seed)
    m = cfg.model
    sam = blsam_model_registry[m.model](sam_checkpoint=m.sam_checkpoint,
                                        keep_ratio=m.keep_ratio, img_size=m.img_size)
    head = PromptHead(copy.deepcopy(sam.prompt_encoder), copy.deepcopy(sam.mask_decoder))
    head.to(dev)
    if m.init == "random":  # the student's encoder only: head and teacher stay SAM
        reinit_image_encoder_(sam, m.model, m.keep_ratio, m.img_size)
    if m.init_checkpoint:  # the student only: head and teacher stay SAM
        load_strict(sam, read_state_dict(m.init_checkpoint, "--init-checkpoint"),
                    f"--init-checkpoint {m.init_checkpoint!r}")
    parts = set_trainable(sam, m.trainable)
    sam.to(dev).train()
    if m.grad_checkpoint:
        enable_grad_checkpointing(sam.image_encoder)
    return sam, head, parts


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
    if info.is_main and not cfg.val.val_only:  # one run owns --output-dir (rundir)
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
            gradient_as_bucket_view=True)  # no second fp32 copy of the grads
    else:
        run.ddp = run.model
