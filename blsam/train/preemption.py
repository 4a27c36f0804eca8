"""Preemption as it really arrives: a grace period, then SIGKILL.

Why: torchrun forwards a SIGTERM (or any signal in its ``--signals-to-handle``) to every worker
and SIGKILLs them after ``--shutdown-timeout`` (30 s by default, or
``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``); SLURM does the same after ``KillWait`` (30 s). A preempted
run must finish its step and write ``last.pth`` inside that grace, and an h_b checkpoint
(snapshot, 9 GB write, fsync) does not fit in 30 s. So the run

* measures what a checkpoint write takes here: at start a short write probe in ``--output-dir``
  (or the time a previous attempt measured, kept in ``ckpt_timing.json``) scaled to the state's
  bytes, then every real write; and warns, at start and after a write, when it does not fit
  ``--preempt-grace`` (default: torchrun's shutdown timeout);
* acts on a signal that arrives during setup at once (``PreemptedDuringSetup``, exit 75): no
  step ran since the checkpoint it would resume from, so there is nothing to save and no reason
  to wait for the first step boundary. Later signals are flags read at the next step boundary
  (``blsam.train.cluster.StopSignals``; a signal during a collective too), and right after a
  validation (``cluster.agreed_stop``), so none costs another step of the grace.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import torch

from ..utils.files import write_json_atomic

log = logging.getLogger("blsam.train")

DEFAULT_GRACE_S = 30.0  # torchrun's --shutdown-timeout and SLURM's KillWait defaults
TIMING_FILE = "ckpt_timing.json"
PROBE_BYTES = 64 << 20


class PreemptedDuringSetup(Exception):
    """A preemption signal before the first step: exit 75 now, nothing to save."""

    def __init__(self, signame: str) -> None:
        super().__init__(f"stopped by {signame} during setup, before the first step: nothing "
                         f"was trained since the checkpoint a rerun resumes from (--resume auto)")
        self.signame = signame


def grace_seconds(option: float | None) -> float:
    """``--preempt-grace``, else the shutdown timeout torchrun was given through its environment
    variable, else 30 s."""
    if option is not None:
        return float(option)
    env = os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT")
    try:
        return float(env) if env else DEFAULT_GRACE_S
    except ValueError:
        return DEFAULT_GRACE_S


def state_bytes(model: torch.nn.Module, adam_like: bool = True) -> int:
    """Bytes a training checkpoint holds: the student's state plus, for Adam-like optimizers,
    two fp32 moments per trainable parameter (created at the first step, so counted here)."""
    n = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if adam_like:
        n += sum(2 * p.numel() * 4 for p in model.parameters() if p.requires_grad)
    return n


def probe_write_rate(folder: str, nbytes: int = PROBE_BYTES) -> float:
    """Bytes per second of a write + fsync of ``nbytes`` in ``folder`` (the file is removed)."""
    path = os.path.join(folder, f".blsam-write-probe-{os.getpid()}")
    block = os.urandom(1 << 20)
    t0 = time.perf_counter()
    try:
        with open(path, "wb") as f:
            for _ in range(max(1, nbytes >> 20)):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
    return nbytes / max(time.perf_counter() - t0, 1e-6)


def read_timing(folder: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(folder, TIMING_FILE), encoding="utf-8") as f:
            rec = json.load(f)
        return rec if float(rec["seconds"]) >= 0 and int(rec["bytes"]) > 0 else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def estimate_write_seconds(folder: str, nbytes: int) -> tuple[float, str]:
    """(seconds, how it was estimated) for writing ``nbytes`` of checkpoint in ``folder``."""
    rec = read_timing(folder)
    if rec is not None:
        secs = float(rec["seconds"]) * nbytes / int(rec["bytes"])
        return secs, f"measured at step {rec.get('step')} of an earlier attempt"
    rate = probe_write_rate(folder, min(PROBE_BYTES, max(nbytes, 4 << 20)))
    # torch.save serialises at about the disk's rate; the snapshot copy comes on top
    return 1.25 * nbytes / rate, f"a write probe in --output-dir ({rate / 2**20:.0f} MiB/s)"


def _advice(seconds: float, grace: float, how: str) -> str:
    need = int(seconds * 1.5 + 60)
    return (f"a checkpoint write takes ~{seconds:.1f} s here ({how}), more than the preemption "
            f"grace of {grace:g} s (--preempt-grace; torchrun --shutdown-timeout, SLURM "
            f"KillWait): a SIGTERM would end in SIGKILL before last.pth is on disk. Give "
            f"torchrun --shutdown-timeout >= {need} and --preempt-grace {need} "
            f"(docs/training.md, Preemption)")


def check_grace_at_start(folder: str, model: torch.nn.Module, grace: float) -> float:
    """Rank 0, before the first step: warn when the estimated write exceeds ``grace``."""
    secs, how = estimate_write_seconds(folder, state_bytes(model))
    if secs > grace:
        log.warning(_advice(secs, grace, how))
    else:
        log.info("checkpoint write estimated at %.1f s (%s), within the preemption grace of "
                 "%g s", secs, how, grace)
    return secs


def note_write(folder: str, step: int, seconds: float, nbytes: int, grace: float) -> None:
    """After a real checkpoint write (rank 0): keep its time for the next attempt's estimate and
    warn when it exceeded ``grace``."""
    try:
        write_json_atomic({"step": step, "seconds": round(seconds, 3), "bytes": nbytes,
                           "grace": grace}, os.path.join(folder, TIMING_FILE))
    except OSError as e:  # the estimate only: never a reason to stop
        log.warning("could not record the checkpoint write time (%s)", e)
    if seconds > grace:
        log.warning(_advice(seconds, grace, f"measured at step {step}"))
