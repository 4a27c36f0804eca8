"""Distillation training of a bLViT-SAM student from its vanilla SAM teacher (paper §3.3, §4.1).

One function, ``train(args)``, drives single-process and torchrun/DDP runs alike. A step is one
optimizer update (``accum_steps`` micro-batches). The data stream is addressed by
(epoch, batch-in-epoch) and every random choice is a function of the seed and that address, so
checkpoints (model, optimizer, scheduler, scaler, RNG states, data position) resume exactly.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import random
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..build_blsam import TEACHER_OF, blsam_model_registry
from ..checkpoint import CheckpointError, save_atomic
from ..utils import dist as du
from .async_ckpt import AsyncCheckpointWriter, load_checkpoint
from .data import EpochBatchSampler, SA1BDataset, collate, select_records
from .losses import feature_loss, mask_losses, total_loss
from .prompts import PROMPT_TYPES
from .teacher import Teacher, cache_covers, check_cache
from .timing import PhaseTimer, StepProfiler, window_record
from .transfer import endless_loader, normalize_images, unpack_batch

log = logging.getLogger("blsam.train")

TRAINABLE_PARTS = ("image_encoder", "prompt_encoder", "mask_decoder")
NO_DECAY_KEYS = ("pos_embed", "rel_pos", "alpha_", "gamma_")
METRIC_KEYS = ("loss", "loss_mask", "loss_iou", "loss_fd", "cos_sim", "iou")


def build_parser() -> argparse.ArgumentParser:
    """Every option is also a config key (``--config`` YAML sets defaults)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a = p.add_argument
    a("--config", default=None, help="YAML file of option: value defaults")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, help="folder of sa_*.tar, folder of jpg/json, or a tar")
    g.add_argument("--shards", nargs="+", default=None, help="use only these tar shards")
    g.add_argument("--data-fraction", type=float, default=0.02,
                   help="fraction of the images under --data (seeded; whole shards if many)")
    g.add_argument("--masks-per-image", type=int, default=16)
    g.add_argument("--prompt-types", nargs="+", default=list(PROMPT_TYPES), choices=PROMPT_TYPES,
                   help=f"drawn per image from {', '.join(PROMPT_TYPES)}")
    g.add_argument("--max-points", type=int, default=3, help="clicks for the 'points' prompt")
    g.add_argument("--num-workers", type=int, default=2)
    g.add_argument("--teacher-cache", default=None, help="dir from tools/cache_teacher.py")
    g.add_argument("--teacher-compile", action="store_true",
                   help="torch.compile the teacher encoder (when no cache covers the data)")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="b_t", choices=sorted(TEACHER_OF))
    g.add_argument("--sam-checkpoint", default=None, help="SAM weights: teacher + P-block init")
    g.add_argument("--img-size", type=int, default=1024)
    g.add_argument("--keep-ratio", type=float, default=0.25)
    g.add_argument("--grad-checkpoint", action=argparse.BooleanOptionalAction, default=False,
                   help="recompute encoder blocks in backward (h_b at batch 8 needs it)")
    g.add_argument("--trainable", default="image_encoder",
                   help="comma list of image_encoder, prompt_encoder, mask_decoder; or 'all'")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=float, default=10)
    g.add_argument("--max-steps", type=int, default=None, help="optimizer steps; beats --epochs")
    g.add_argument("--batch-size", type=int, default=8, help="images per process per micro-step")
    g.add_argument("--accum-steps", type=int, default=1)
    g.add_argument("--lr", type=float, default=5e-4)
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--betas", type=float, nargs=2, default=[0.9, 0.999])
    g.add_argument("--warmup-steps", type=int, default=250)
    g.add_argument("--min-lr-ratio", type=float, default=0.01, help="cosine floor, x lr")
    g.add_argument("--clip-grad", type=float, default=1.0, help="max grad norm; 0 disables")
    g.add_argument("--lambda-fd", type=float, default=2.5)
    g.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "none"),
                   help="auto: bf16 on GPU, none on CPU")
    g = p.add_argument_group("run")
    g.add_argument("--output-dir", default=None)
    g.add_argument("--resume", default=None, help="'auto' (output-dir/last.pth if any) or a path")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    g.add_argument("--log-every", type=int, default=20)
    g.add_argument("--save-every", type=int, default=1000)
    g.add_argument("--keep-last", type=int, default=3, help="step_*.pth files kept")
    g.add_argument("--stop-after", type=int, default=None,
                   help="save and exit after this many steps (time-limited jobs; resume later)")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    g.add_argument("--profile", type=int, default=0,
                   help="write a torch.profiler trace of this many steps (0: none)")
    return p


# ---------------------------------------------------------------- model


class DistillModel(nn.Module):
    """Student forward + all losses in one module, so DDP sees every trainable parameter."""

    def __init__(self, sam: nn.Module, lambda_fd: float) -> None:
        super().__init__()
        self.sam = sam
        self.lambda_fd = lambda_fd

    def forward(self, images: torch.Tensor, batch: Dict[str, Any], teacher_emb: torch.Tensor
                ) -> Dict[str, torch.Tensor]:
        sam = self.sam
        emb = sam.image_encoder(images)
        out = feature_loss(emb, teacher_emb)
        dev = images.device
        image_pe = sam.prompt_encoder.get_dense_pe()
        sums = {k: torch.zeros((), device=dev) for k in ("loss_mask", "loss_iou", "iou")}
        n = 0
        for i, masks in enumerate(batch["masks"]):
            if masks is None or masks.shape[0] == 0:
                continue
            kind = batch["kind"][i]
            if kind == "box":
                sparse, dense = sam.prompt_encoder(
                    points=None, boxes=batch["boxes"][i].to(dev), masks=None)
            else:
                pts = (batch["points"][i].to(dev), batch["labels"][i].to(dev))
                sparse, dense = sam.prompt_encoder(points=pts, boxes=None, masks=None)
            logits, iou_pred = sam.mask_decoder(
                image_embeddings=emb[i:i + 1], image_pe=image_pe,
                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                multimask_output=(kind == "point"))
            for k, v in mask_losses(logits, iou_pred, masks.to(dev)).items():
                sums[k] = sums[k] + v
            n += masks.shape[0]
        if n:
            supervised = (sums["loss_mask"] + sums["loss_iou"]) / n
        else:  # keep trainable decoder params in the graph so DDP's reducer does not stall
            supervised = sum((p.sum() * 0 for n_, p in sam.named_parameters()
                              if p.requires_grad and not n_.startswith("image_encoder.")),
                             torch.zeros((), device=dev))
        out["loss"] = total_loss(supervised, out["loss_fd"], self.lambda_fd)
        out["loss_mask"] = sums["loss_mask"].detach() / max(n, 1)
        out["loss_iou"] = sums["loss_iou"].detach() / max(n, 1)
        out["iou"] = sums["iou"] / max(n, 1)
        out["n_masks"] = torch.full((), float(n), device=dev)  # a fill: no host-to-device copy
        return out


def set_trainable(sam: nn.Module, spec: str) -> List[str]:
    """requires_grad only on the named parts; returns the parts."""
    parts = list(TRAINABLE_PARTS) if spec.strip() == "all" else [
        s.strip() for s in spec.split(",") if s.strip()]
    bad = [s for s in parts if s not in TRAINABLE_PARTS]
    if bad or not parts:
        raise ValueError(f"--trainable {spec!r}: parts must be among {TRAINABLE_PARTS} or 'all'")
    for name in TRAINABLE_PARTS:
        getattr(sam, name).requires_grad_(name in parts)
    return parts


def enable_grad_checkpointing(encoder: nn.Module) -> None:
    """Recompute each encoder block in backward instead of keeping its activations.

    The block's ``forward`` is wrapped on the instance, so parameter names (and checkpoints)
    stay SAM's. Non-reentrant checkpointing handles the routing dataclass and DDP.
    """
    from torch.utils.checkpoint import checkpoint

    for blk in encoder.blocks:
        inner = blk.forward

        def forward(*a: Any, _inner=inner, **k: Any) -> torch.Tensor:
            if not torch.is_grad_enabled():
                return _inner(*a, **k)
            return checkpoint(_inner, *a, use_reentrant=False, **k)

        blk.forward = forward


def param_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """AdamW groups: no decay on norms, biases, position tables, alpha and gamma."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or any(k in name for k in NO_DECAY_KEYS):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """AdamW; the fused kernel (one pass over all tensors, ~6x faster on CPU) when available."""
    groups = param_groups(model, args.weight_decay)
    try:
        return torch.optim.AdamW(groups, lr=args.lr, betas=tuple(args.betas), fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=args.lr, betas=tuple(args.betas))


def lr_lambda(warmup: int, total: int, min_ratio: float):
    """Linear warmup to 1, then cosine to ``min_ratio`` at ``total`` steps (per optimizer step)."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return f


def amp_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]


def state_checksum(state: Dict[str, torch.Tensor]) -> str:
    """sha256 over a state dict's tensors in key order (bitwise identity across ranks)."""
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()


# ---------------------------------------------------------------- checkpoints


def rng_state() -> Dict[str, Any]:
    """RNG states as tensors and plain types, so ``torch.load(weights_only=True)`` reads them."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": {"version": py_state[0], "state": torch.tensor(py_state[1], dtype=torch.int64),
                   "gauss": py_state[2]},
    }


def set_rng_state(s: Dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    if s.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    n = s["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    p = s["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))


def find_resume(resume: Optional[str], output_dir: str) -> Optional[str]:
    if not resume:
        return None
    if resume == "auto":
        path = os.path.join(output_dir, "last.pth")
        return path if os.path.isfile(path) else None
    if not os.path.isfile(resume):
        raise FileNotFoundError(f"--resume {resume!r} does not exist")
    return resume


def save_training_checkpoint(state: Dict[str, Any], output_dir: str, step: int,
                             numbered: bool, keep_last: int) -> None:
    """``last.pth`` always; ``step_N.pth`` too when ``numbered`` (a hard link, one write)."""
    last = os.path.join(output_dir, "last.pth")
    if not numbered:
        save_atomic(state, last)
        return
    path = save_atomic(state, os.path.join(output_dir, f"step_{step:07d}.pth"))
    tmp = os.path.join(output_dir, f".last.pth.link.{os.getpid()}")
    try:
        os.link(path, tmp)
        os.replace(tmp, last)
    except OSError:
        save_atomic(state, last)
    old = sorted(f for f in os.listdir(output_dir) if f.startswith("step_") and f.endswith(".pth"))
    for f in old[:-keep_last] if keep_last > 0 else []:
        os.remove(os.path.join(output_dir, f))


def _truncate_metrics(path: str, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (they will be redone)."""
    if not os.path.isfile(path):
        return
    with open(path, "r", encoding="utf-8") as f:
        lines = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= step]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(lines)


# ---------------------------------------------------------------- data stream


def batch_stream(ds: SA1BDataset, sampler: EpochBatchSampler, num_workers: int, epoch: int,
                 start_batch: int, pin: bool) -> Iterator[Tuple[int, int, Dict[str, Any]]]:
    """Endless (epoch, batch index, batch) from a data position; one DataLoader for the run
    (persistent workers); on CUDA batches come packed for one transfer (``unpack_batch``)."""
    yield from endless_loader(ds, sampler, collate, num_workers, epoch, start_batch, pin)


# ---------------------------------------------------------------- training


def train(args: argparse.Namespace) -> Dict[str, Any]:
    """Run (or resume) a distillation run; returns the final summary (rank 0's view)."""
    if not args.output_dir:
        raise ValueError("--output-dir is required")
    if not args.sam_checkpoint:
        raise ValueError("--sam-checkpoint is required (SAM weights for teacher and P-blocks)")
    if not os.path.isfile(args.sam_checkpoint):
        raise FileNotFoundError(f"--sam-checkpoint {args.sam_checkpoint!r} does not exist")
    for name in ("batch_size", "accum_steps", "log_every", "save_every", "masks_per_image"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.profile < 0:
        raise ValueError(f"--profile must be >= 0, got {args.profile}")
    info = du.init_distributed(args.device)
    dev = info.device
    teacher_name = TEACHER_OF[args.model]
    # data first: a bad --data must fail before any model is built
    records, index_skipped = select_records(args.data, args.shards, args.data_fraction, args.seed)
    if args.teacher_cache:
        check_cache(args.teacher_cache, teacher_name, args.img_size, args.sam_checkpoint)
    ds = SA1BDataset(records, args.img_size, args.masks_per_image, args.prompt_types,
                     args.max_points, args.seed, args.teacher_cache, uint8_images=True)
    sampler = EpochBatchSampler(len(ds), args.batch_size, info.rank, info.world_size, args.seed)
    batches_per_epoch = len(sampler)
    total = args.max_steps or max(1, int(args.epochs * batches_per_epoch) // args.accum_steps)
    if info.is_main:
        os.makedirs(args.output_dir, exist_ok=True)
        log.info("%d images (%d damaged items skipped while indexing), %d batches/epoch/rank, "
                 "%d steps, world size %d", len(ds), len(index_skipped), batches_per_epoch,
                 total, info.world_size)

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    sam = blsam_model_registry[args.model](
        sam_checkpoint=args.sam_checkpoint, keep_ratio=args.keep_ratio, img_size=args.img_size)
    parts = set_trainable(sam, args.trainable)
    sam.to(dev).train()
    if args.grad_checkpoint:
        enable_grad_checkpointing(sam.image_encoder)
    dtype = amp_dtype(args.amp, dev)
    teacher = Teacher(teacher_name, args.sam_checkpoint, args.img_size, dev, dtype,
                      compile=args.teacher_compile)
    if not cache_covers(args.teacher_cache, [r.key for r in records]):
        teacher.build()
    elif info.is_main:
        log.info("teacher cache covers every image: no teacher model built")

    model = DistillModel(sam, args.lambda_fd)
    opt = make_optimizer(sam, args)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda(args.warmup_steps, total, args.min_lr_ratio))
    scaler = torch.amp.GradScaler(dev.type) if dtype == torch.float16 else None

    step, epoch, batch_in_epoch, read_skipped = 0, 0, 0, 0
    resume_path = find_resume(args.resume, args.output_dir)
    if resume_path:
        ck = load_checkpoint(resume_path)  # memory-mapped
        for key in ("model", "img_size"):
            old = ck["config"].get(key)
            if old != getattr(args, key):
                raise CheckpointError(f"{resume_path!r} was trained with {key}={old!r}, "
                                      f"not {getattr(args, key)!r}")
        sam.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        if scaler is not None and ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        step, epoch, batch_in_epoch = ck["step"], ck["epoch"], ck["batch_in_epoch"]
        read_skipped = ck.get("skipped_read", 0)
        set_rng_state(ck["rng"])
        if info.is_main:
            log.info("resumed from %s at step %d (epoch %d, batch %d)", resume_path, step,
                     epoch, batch_in_epoch)
            _truncate_metrics(os.path.join(args.output_dir, "metrics.jsonl"), step)
    elif info.is_main:
        if args.resume:
            log.info("--resume %s: no checkpoint in %s, starting fresh", args.resume,
                     args.output_dir)
        elif os.path.isfile(os.path.join(args.output_dir, "last.pth")):
            log.warning("%s holds a checkpoint but --resume was not given: starting from "
                        "scratch and overwriting it", args.output_dir)
        _truncate_metrics(os.path.join(args.output_dir, "metrics.jsonl"), 0)  # a fresh log

    if info.distributed:
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None,
            # the prompt encoder has embeddings no prompt kind uses (mask_downscaling, ...)
            find_unused_parameters="prompt_encoder" in parts)
    else:
        ddp = model

    writer = None
    jsonl = None
    if info.is_main:
        try:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(os.path.join(args.output_dir, "tb"))
        except ImportError:
            log.info("tensorboard not installed: no TensorBoard scalars (metrics.jsonl only)")
        jsonl = open(os.path.join(args.output_dir, "metrics.jsonl"), "a", encoding="utf-8")
    bar = None
    if info.is_main and not args.no_progress:
        from tqdm import tqdm
        bar = tqdm(total=total, initial=step, dynamic_ncols=True, desc="train")

    stream = batch_stream(ds, sampler, args.num_workers, epoch, batch_in_epoch,
                          pin=dev.type == "cuda")
    config = {k: v for k, v in vars(args).items()}
    window = torch.zeros(len(METRIC_KEYS) + 2, dtype=torch.float64)  # + images, steps
    window_dev = torch.zeros(len(METRIC_KEYS), dtype=torch.float64, device=dev)
    t_window = time.perf_counter()
    history: List[Dict[str, Any]] = []
    timer = PhaseTimer(dev)  # per-phase laps; profiler trace on global rank 0 only
    prof = StepProfiler(args.profile if info.is_main else 0, args.output_dir, info.rank, dev)
    ckpt_writer = AsyncCheckpointWriter()  # snapshot now, write in a background thread
    while step < total:
        for micro in range(args.accum_steps):
            epoch, b, batch = next(stream)
            batch = unpack_batch(batch, dev)  # one non-blocking copy per batch (CUDA)
            timer.lap("data")
            epoch, batch_in_epoch = (epoch, b + 1) if b + 1 < batches_per_epoch else (epoch + 1, 0)
            read_skipped += len(batch["skipped"])
            images = normalize_images(batch["image"].to(dev, non_blocking=True), batch["hw"])
            t_emb = teacher.embeddings(images, batch["teacher"])
            timer.lap("teacher")
            sync = (contextlib.nullcontext() if micro == args.accum_steps - 1
                    or not info.distributed else ddp.no_sync())
            with sync:
                with torch.autocast(dev.type, dtype=dtype or torch.float32,
                                    enabled=dtype is not None):
                    out = ddp(images, batch, t_emb)
                timer.lap("forward")
                loss = out["loss"] / args.accum_steps
                (scaler.scale(loss) if scaler else loss).backward()
            timer.lap("backward")
            # summed on the device: no host sync per micro-step, only at log time
            window_dev += torch.stack([out[k].detach().double() for k in METRIC_KEYS])
            window[-2:] += torch.tensor([images.shape[0], 1], dtype=torch.float64)
        if scaler:
            scaler.unscale_(opt)
        if args.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(sam.parameters(), args.clip_grad)
        (scaler.step(opt) if scaler else opt.step())
        if scaler:
            scaler.update()
        opt.zero_grad(set_to_none=True)
        lr = sched.get_last_lr()[0]
        sched.step()
        step += 1
        timer.lap("optimizer")
        prof.step()

        if step % args.log_every == 0 or step == total:
            window[: len(METRIC_KEYS)] = window_dev.cpu()
            agg = torch.cat([window, torch.tensor([float(read_skipped)], dtype=torch.float64)])
            if info.distributed:  # on the process group's device (nccl reduces CUDA tensors)
                agg = agg.to(dev)
                torch.distributed.all_reduce(agg)
                agg = agg.cpu()
            skipped_total, agg = agg[-1:], agg[:-1]
            elapsed = time.perf_counter() - t_window
            n_micro = agg[-1].item()
            rec = {"step": step, "epoch": round(epoch + batch_in_epoch / batches_per_epoch, 4),
                   **{k: agg[i].item() / n_micro for i, k in enumerate(METRIC_KEYS)},
                   "lr": lr, "images_per_s": window[-2].item() / max(elapsed, 1e-9),
                   "skipped_read": int(skipped_total.item()),
                   "skipped_index": len(index_skipped), "time": time.time(),
                   **window_record(timer.collect(), agg[-2].item())}
            history.append(rec)
            if info.is_main:
                jsonl.write(json.dumps(rec) + "\n")
                jsonl.flush()
                if writer is not None:
                    for k in METRIC_KEYS + ("lr", "images_per_s"):
                        writer.add_scalar(f"train/{k}", rec[k], step)
                if bar is not None:
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", cos=f"{rec['cos_sim']:.3f}",
                                    img_s=f"{rec['images_per_s']:.2f}")
            window.zero_()
            window_dev.zero_()
            t_window = time.perf_counter()
        if bar is not None:
            bar.update(1)

        stop_now = args.stop_after is not None and args.stop_after <= step < total
        if step % args.save_every == 0 or step == total or stop_now:
            if info.is_main:
                state = {
                    "model": sam.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "scaler": scaler.state_dict() if scaler else None,
                    "step": step, "total_steps": total, "epoch": epoch,
                    "batch_in_epoch": batch_in_epoch, "skipped_read": read_skipped,
                    "rng": rng_state(), "config": config,
                }
                ckpt_writer.save(save_training_checkpoint, state, args.output_dir, step,
                                 step % args.save_every == 0, args.keep_last)
            du.barrier()
        timer.lap("checkpoint")
        if stop_now:
            break

    prof.stop()
    ckpt_writer.wait()
    if bar is not None:
        bar.close()
    if step < total:  # --stop-after: the checkpoint is written, --resume continues
        if info.is_main:
            log.info("stopped after step %d of %d (--stop-after); resume with --resume auto",
                     step, total)
            jsonl.close()
            if writer is not None:
                writer.close()
        return {"steps": step, "stopped": True, "history": history}
    checksum = state_checksum(sam.state_dict())
    checksums = du.all_gather_objects(checksum)
    summary = {"steps": step, "world_size": info.world_size, "checksums": checksums,
               "ranks_in_sync": len(set(checksums)) == 1, "teacher_images_computed":
               teacher.images_computed, "teacher_built": teacher.encoder is not None,
               "history": history}
    if info.is_main:
        save_atomic(sam.state_dict(), os.path.join(args.output_dir, "final.pth"))
        with open(os.path.join(args.output_dir, "summary.json"), "w", encoding="utf-8") as f:
            json.dump({k: v for k, v in summary.items() if k != "history"}, f, indent=1)
        if writer is not None:
            writer.close()
        jsonl.close()
    if not summary["ranks_in_sync"]:
        raise RuntimeError(f"ranks ended with different weights: {checksums}")
    du.barrier()
    return summary
