"""What a run reports: metrics.jsonl / val.jsonl, TensorBoard scalars and the progress bar
(rank 0), and the train record of a logging window averaged over every rank."""
from __future__ import annotations

import json
import logging
import os
import time
from typing import TYPE_CHECKING, Any

import torch

from ..utils.files import wait_for_later_event_file
from .distill import METRIC_KEYS
from .resume import COUNTERS
from .timing import window_record

if TYPE_CHECKING:
    from .run import Run

log = logging.getLogger("blsam.train")


class MetricsLog:
    """metrics.jsonl / val.jsonl and TensorBoard on rank 0. After a resume TensorBoard purges
    the events the killed run wrote past the checkpoint (``purge_step``), so no step shows
    twice."""

    def __init__(self, run: Run) -> None:
        self.writer = None
        self.train_f = self.val_f = None
        self.bar = None
        self.failures = run.failures  # a failed write stops every rank at the next step
        cfg = run.cfg
        if not run.info.is_main:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
            wait_for_later_event_file(os.path.join(cfg.ckpt.output_dir, "tb"))
            self.writer = SummaryWriter(os.path.join(cfg.ckpt.output_dir, "tb"),
                                        purge_step=run.step + 1 if run.resumed_from else None)
        except ImportError:
            log.info("tensorboard not installed: no TensorBoard scalars (metrics.jsonl only)")
        out = cfg.ckpt.output_dir
        self.train_f = open(os.path.join(out, "metrics.jsonl"), "a", encoding="utf-8")
        self.val_f = open(os.path.join(out, "val.jsonl"), "a", encoding="utf-8")
        if not cfg.log.no_progress:
            from tqdm import tqdm
            self.bar = tqdm(total=run.total, initial=run.step, dynamic_ncols=True, desc="train")

    def write(self, split: str, rec: dict[str, Any], keys: tuple[str, ...]) -> None:
        f = self.train_f if split == "train" else self.val_f
        if f is None:
            return
        with self.failures.guard(f"writing {split} metrics"):
            self._write(f, split, rec, keys)

    def _write(self, f: Any, split: str, rec: dict[str, Any], keys: tuple[str, ...]) -> None:
        f.write(json.dumps(rec) + "\n")
        f.flush()
        if self.writer is not None:
            for k in keys:
                self.writer.add_scalar(f"{split}/{k}", rec[k], rec["step"])
            self.writer.flush()
        if self.bar is not None and split == "train":
            self.bar.set_postfix(loss=f"{rec['loss']:.4f}", cos=f"{rec['cos_sim']:.3f}",
                                 img_s=f"{rec['images_per_s']:.2f}")

    def close(self) -> None:
        for f in (self.train_f, self.val_f):
            if f is not None:
                f.close()
        if self.writer is not None:
            self.writer.close()
        if self.bar is not None:
            self.bar.close()


class LogInterval:
    """Metrics summed over the steps since the last log line (on the device: no host sync per
    step), images and micro-steps; the window's time comes from ``run.timer``'s laps."""

    def __init__(self, dev: torch.device) -> None:
        self.dev_sums = torch.zeros(len(METRIC_KEYS), dtype=torch.float64, device=dev)
        self.images = 0
        self.micro = 0

    def reset(self) -> None:
        self.dev_sums.zero_()
        self.images = self.micro = 0


def log_window(run: Run, win: LogInterval, mlog: MetricsLog, lr: float) -> None:
    """One train record: metrics averaged over every rank's micro-steps; ``images_per_s`` is
    the global rate (all ranks) over the window's training time: the timer's laps without the
    checkpoint and validation phases (``global_images_per_s``, the same number)."""
    counts = [float(run.counters[k]) for k in COUNTERS]
    agg = torch.cat([win.dev_sums.double().cpu(),
                     torch.tensor([win.images, win.micro] + counts, dtype=torch.float64)])
    if run.info.distributed:  # on the process group's device (nccl reduces CUDA tensors)
        agg = agg.to(run.dev)
        torch.distributed.all_reduce(agg)
        agg = agg.cpu()
    nk = len(METRIC_KEYS)
    images, n_micro = agg[nk].item(), max(agg[nk + 1].item(), 1.0)
    timing = window_record(run.timer.collect(), images)
    rec = {"step": run.step,
           "epoch": round(run.epoch + run.batch_in_epoch / run.batches_per_epoch, 4),
           **{k: agg[i].item() / n_micro for i, k in enumerate(METRIC_KEYS)},
           "lr": lr, "images": int(images), "images_per_s": timing["global_images_per_s"],
           **{k: int(agg[nk + 2 + j].item()) for j, k in enumerate(COUNTERS)},
           "skipped_index": len(run.index_skipped), "nonfinite_steps": run.nonfinite_steps,
           "time": time.time(), **timing}
    run.history.append(rec)
    mlog.write("train", rec, METRIC_KEYS + ("lr", "images_per_s"))
    win.reset()
