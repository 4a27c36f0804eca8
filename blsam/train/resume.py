"""Checkpoints of a training run and resuming them without silently changing the run.

A checkpoint records the run's *signature*: every setting that decides which images a step
sees, how the LR moves, or what the loss is (world size, per-process batch, accumulation, step
count, data selection, seed, image size, prompts, loss options, ...). Resuming continues
exactly when the signature matches; otherwise it is refused with one message naming every
difference, unless ``--resume-remap`` asks to continue by the number of images seen (a new
data position and LR-schedule position are computed, with a warning). Model, image size and
trainable parts can never be remapped: the weights or optimizer state would not fit.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..checkpoint import save_atomic
from ..errors import UserError

log = logging.getLogger("blsam.train")

# options that change a result; the run signature holds these plus world size, step count and
# the identity of the selected images
SIGNATURE_OPTIONS = (
    "model", "img_size", "trainable", "batch_size", "accum_steps", "data_fraction", "shards",
    "seed", "masks_per_image", "prompt_types", "max_points", "prompt_iters", "fd_padding",
    "max_mask_fraction", "lambda_fd", "lr", "weight_decay", "betas", "warmup_steps",
    "min_lr_ratio", "clip_grad", "keep_ratio", "amp",
)
NEVER_REMAP = ("model", "img_size", "trainable")
COUNTERS = ("skipped_read", "bad_ann", "large_ann")  # per rank, summed when logged


class ResumeError(UserError):
    """A checkpoint that cannot continue this run as asked."""


def run_signature(options: Mapping[str, Any], world_size: int, total_steps: int,
                  keys: Sequence[str]) -> dict[str, Any]:
    """Plain (JSON-able) values of everything that makes two runs the same run; ``options``
    is the flat option view (``TrainConfig.options()``), an absent option counts as None."""
    sig: dict[str, Any] = {}
    for k in SIGNATURE_OPTIONS:
        v = options.get(k)
        sig[k] = list(v) if isinstance(v, (list, tuple)) else v
    sig["world_size"] = world_size
    sig["total_steps"] = total_steps
    sig["images"] = len(keys)
    sig["images_sha"] = hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:16]
    return sig


def signature_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'key: saved -> current' for every differing key (a key the checkpoint lacks counts)."""
    out = []
    for k, v in current.items():
        old = saved.get(k, "<not recorded>")
        if isinstance(old, tuple):
            old = list(old)
        if old != v:
            out.append(f"{k} {old!r} -> {v!r}")
    return out


def saved_signature(ck: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's signature; older checkpoints only had their config (no world size)."""
    if "run" in ck:
        return dict(ck["run"])
    cfg = ck.get("config", {})
    sig = {k: (list(cfg[k]) if isinstance(cfg.get(k), (list, tuple)) else cfg[k])
           for k in SIGNATURE_OPTIONS if k in cfg}
    if "total_steps" in ck:
        sig["total_steps"] = ck["total_steps"]
    return sig


def check_resume(path: str, saved: dict[str, Any], current: dict[str, Any], remap: bool
                 ) -> list[str]:
    """Differences that remapping will absorb ([] = exact resume); raise when not allowed."""
    diffs = signature_differences(saved, current)
    hard = [d for d in diffs if d.split(" ", 1)[0] in NEVER_REMAP]
    if hard:
        raise ResumeError(f"cannot resume {path!r}: it belongs to another model: "
                          f"{'; '.join(hard)}")
    if diffs and not remap:
        raise ResumeError(
            f"cannot resume {path!r} exactly, it was written by a run with other settings: "
            f"{'; '.join(diffs)}. Use the same settings, or pass --resume-remap to continue by "
            f"the number of images seen (data order and LR position are recomputed)")
    return diffs


def remap_position(ck: dict[str, Any], global_batch: int, batches_per_epoch: int
                   ) -> dict[str, int]:
    """(step, epoch, batch_in_epoch) of a new run geometry after the same number of images
    and the same fraction of epochs as the checkpoint."""
    images = int(ck.get("images_seen", 0))
    if not images:  # older checkpoints: derive it from the run's geometry if recorded
        run = ck.get("run", {})
        g = (run.get("world_size") or 1) * run.get("batch_size", 1) * run.get("accum_steps", 1)
        images = int(ck["step"]) * g
    old_bpe = int(ck.get("batches_per_epoch") or batches_per_epoch)
    epochs_done = int(ck["epoch"]) + int(ck["batch_in_epoch"]) / max(old_bpe, 1)
    micro = int(round(epochs_done * batches_per_epoch))
    return {"step": images // global_batch, "epoch": micro // batches_per_epoch,
            "batch_in_epoch": micro % batches_per_epoch, "images_seen": images}


def restore_counters(ck: dict[str, Any], rank: int, world_size: int, exact: bool
                     ) -> dict[str, int]:
    """This rank's share of the saved per-rank counters: its own entry on an exact resume; on
    a remapped one (ranks no longer correspond) rank 0 takes the sums, the others start at 0."""
    saved = ck.get("counters")
    out = {k: 0 for k in COUNTERS}
    if saved is None:  # older checkpoints: rank 0's count only
        if rank == 0:
            out["skipped_read"] = int(ck.get("skipped_read", 0))
        return out
    for k in COUNTERS:
        per_rank = [int(v) for v in saved.get(k, [])]
        if exact and len(per_rank) == world_size:
            out[k] = per_rank[rank]
        elif rank == 0:
            out[k] = sum(per_rank)
    return out


# ---------------------------------------------------------------- RNG state


def rng_state() -> dict[str, Any]:
    """RNG states as tensors and plain types, so ``torch.load(weights_only=True)`` reads them."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        # this process's device only: all devices' states would not restore on another node
        # shape (another number of visible GPUs per process)
        "cuda": (torch.cuda.get_rng_state(torch.cuda.current_device())
                 if torch.cuda.is_available() and torch.cuda.is_initialized() else None),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": {"version": py_state[0], "state": torch.tensor(py_state[1], dtype=torch.int64),
                   "gauss": py_state[2]},
    }


def set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    cuda = s.get("cuda")
    if isinstance(cuda, (list, tuple)):  # older checkpoints: every visible device's state
        cuda = cuda[torch.cuda.current_device()] if (
            torch.cuda.is_available() and torch.cuda.current_device() < len(cuda)) else None
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda, torch.cuda.current_device())
    n = s["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    p = s["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))


# ---------------------------------------------------------------- files


def find_resume(resume: str | None, output_dir: str) -> str | None:
    """The newest candidate (``last.pth`` for ``auto``); ``resume_candidates`` lists them all."""
    c = resume_candidates(resume, output_dir)
    return c[0] if c else None


def resume_candidates(resume: str | None, output_dir: str) -> list[str]:
    """``--resume auto``: ``last.pth`` then ``step_N.pth`` newest first (``load_resume`` takes
    the first valid one); an explicit path: just that file."""
    if not resume:
        return []
    if resume == "auto":
        if not os.path.isdir(output_dir):
            return []
        out = [os.path.join(output_dir, "last.pth")]
        out = [p for p in out if os.path.isfile(p)]
        steps = sorted((f for f in os.listdir(output_dir)
                        if f.startswith("step_") and f.endswith(".pth")), reverse=True)
        return out + [os.path.join(output_dir, f) for f in steps]
    if not os.path.isfile(resume):
        raise FileNotFoundError(f"--resume {resume!r} does not exist")
    return [resume]


def load_resume(resume: str | None, output_dir: str
                ) -> tuple[str | None, dict[str, Any] | None]:
    """(path, checkpoint) to resume from, or (None, None) to start fresh. ``auto`` skips an
    unreadable, damaged or non-finite newest checkpoint with a warning naming it and takes the
    newest valid one; none valid is one error naming each file and why."""
    from ..checkpoint import CheckpointError

    candidates = resume_candidates(resume, output_dir)
    if resume != "auto":
        if not candidates:
            return None, None
        try:
            return candidates[0], load_training_checkpoint(candidates[0])
        except CheckpointError as e:
            others = [p for p in resume_candidates("auto", os.path.dirname(candidates[0]) or ".")
                      if os.path.abspath(p) != os.path.abspath(candidates[0])]
            if others:
                raise CheckpointError(f"{e} (other checkpoints in that folder: "
                                      f"{', '.join(os.path.basename(p) for p in others[:3])}; "
                                      f"--resume auto takes the newest valid one)") from None
            raise
    failed = []
    for path in candidates:
        try:
            ck = load_training_checkpoint(path)
        except CheckpointError as e:
            log.warning("--resume auto: skipping %s: %s", path, e)
            failed.append(f"{os.path.basename(path)} ({e})")
            continue
        if failed:
            log.warning("--resume auto: resuming from %s (step %d), the newest valid checkpoint",
                        path, ck["step"])
        return path, ck
    if failed:
        raise CheckpointError(f"--resume auto: no valid checkpoint in {output_dir!r}: "
                              + "; ".join(failed))
    return None, None


def verify_zip(path: str) -> str | None:
    """The first member of a torch.save zip whose CRC-32 does not match its bytes (garbage
    written into the file after it was saved), or a reason it cannot be read; None if sound."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except Exception as e:  # noqa: BLE001 -- truncated central directory etc.
        return f"damaged zip archive ({type(e).__name__}: {e})"
    return f"damaged: CRC-32 mismatch in {bad!r}" if bad else None


def load_training_checkpoint(path: str) -> dict[str, Any]:
    """A training checkpoint (model, optimizer, position, signature), read safely; refused
    when its bytes fail their CRC-32 or a model/optimizer tensor is not finite."""
    import zipfile

    from ..checkpoint import CheckpointError, load_error_text, safe_load
    from .cluster import first_nonfinite

    is_zip = zipfile.is_zipfile(path)
    if is_zip:
        why = verify_zip(path)
        if why:
            raise CheckpointError(f"could not read --resume {path!r}: {why}")
    try:  # memory-mapped (an h_b checkpoint is ~9 GB); legacy non-zip files cannot be
        ck = safe_load(path, mmap=is_zip)
    except Exception as e:  # noqa: BLE001 -- any failure means the same thing to the user
        raise CheckpointError(f"could not read --resume {path!r}: {load_error_text(path, e)}"
                              ) from e
    need = ("model", "optimizer", "scheduler", "step", "epoch", "batch_in_epoch")
    if not isinstance(ck, dict) or any(k not in ck for k in need):
        raise CheckpointError(f"--resume {path!r} is not a training checkpoint (no "
                              f"{', '.join(need)}): final.pth or an official checkpoint "
                              f"cannot be resumed")
    bad = first_nonfinite(ck)
    if bad:
        raise CheckpointError(f"--resume {path!r} holds non-finite values (NaN/inf) in "
                              f"{bad}: refusing to resume from it")
    return ck


def save_training_checkpoint(state: dict[str, Any], output_dir: str, step: int,
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
    from .rundir import rotate  # only this run's step files are pruned

    rotate(output_dir, path, keep_last)


def clean_stale_temp_files(output_dir: str) -> list[str]:
    """Temp files of dead processes removed, live ones kept (``rundir.clean_stale_temp_files``)."""
    from .rundir import clean_stale_temp_files as clean

    return clean(output_dir)


def truncate_jsonl(path: str, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (they will be redone), and
    a torn line (a kill mid-write) with a warning: never fatal."""
    if not os.path.isfile(path):
        return
    lines, torn = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for ln in f:
            if not ln.strip():
                continue
            try:
                rec = json.loads(ln)
                keep = int(rec.get("step", 0)) <= step
            except (ValueError, AttributeError, TypeError):
                torn += 1
                continue
            if keep:
                lines.append(ln if ln.endswith("\n") else ln + "\n")
    if torn:
        log.warning("%s: dropped %d unreadable line(s) (a write cut off by a kill)", path, torn)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(lines)
