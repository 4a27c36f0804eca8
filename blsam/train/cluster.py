"""What a training run needs to survive a cluster: a non-finite guard, preemption signals,
ranks that agree before the first step, and an output folder checked before anything is built.

* Non-finite guard: a step whose loss or gradient norm is not finite (on any rank) skips the
  optimizer update on every rank. The ranks agree through ONE small all-reduce per step
  (``step_flags``), which also carries the "stop now" flag of a preemption signal and the
  "failed" flag of rank-local work (``blsam.train.failures``), so every rank stops at the same
  step boundary. ``--max-nonfinite-steps`` consecutive skips end the run
  (``NonFiniteError``, exit code 3). No checkpoint is written with a non-finite tensor and a
  checkpoint holding one is refused on resume (``first_nonfinite``).
* Preemption: ``StopSignals`` turns SIGTERM / SIGUSR1 (``--preempt-signals``) and SIGINT into a
  flag read at the next step boundary; the run writes ``last.pth`` and exits with
  ``EXIT_PREEMPTED`` (75, EX_TEMPFAIL: "try again", i.e. ``--resume auto``). A second SIGINT
  interrupts at once.
* Agreement: ``check_ranks_agree`` gathers every rank's view of the run (signature, data,
  resume file and step, step count, teacher cache) and raises the same ``RankMismatchError``
  on every rank, naming what differs and on which ranks, instead of training on different data
  or waiting in a collective forever.
"""
from __future__ import annotations

import hashlib
import logging
import os
import signal
import tempfile
from collections.abc import Sequence
from typing import Any

import torch

from ..checkpoint import first_nonfinite  # noqa: F401  (re-exported: loop, resume)
from ..errors import UserError

log = logging.getLogger("blsam.train")

EXIT_NONFINITE = 3  # --max-nonfinite-steps consecutive non-finite steps
EXIT_PREEMPTED = 75  # stopped by a signal, checkpoint written: rerun with --resume auto
EXIT_INTERRUPTED = 130  # a second Ctrl-C: stopped at once, no checkpoint
PREEMPT_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGHUP", "SIGCONT")


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite steps, or non-finite weights about to be saved."""


class RankMismatchError(UserError):
    """Ranks that do not describe the same run (different data, resume file, ...)."""


class OutputDirError(UserError):
    """--output-dir cannot hold the run's files."""


# ---------------------------------------------------------------- output folder


def check_output_dir(path: str, what: str = "--output-dir") -> None:
    """``path`` exists as a writable folder, or can be created (nothing is created here: a run
    refused later leaves no folder behind)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputDirError(f"{what} {path!r} is a file, not a folder")
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise OutputDirError(f"{what} {path!r} cannot be created: {probe!r} is a file")
    try:  # os.access says yes to root on a read-only mount: really write
        with tempfile.TemporaryFile(dir=probe, prefix=".blsam-write-check-"):
            pass
    except OSError as e:
        raise OutputDirError(f"{what} {path!r} is not writable ({probe!r}: "
                             f"{e.strerror or e})") from None


# ---------------------------------------------------------------- non-finite values


def step_flags(loss_bad: torch.Tensor, grad_bad: torch.Tensor, stop: bool, distributed: bool,
               failed: bool = False) -> tuple[bool, bool, bool, bool]:
    """(loss non-finite on some rank, grad norm non-finite on some rank, some rank asked to
    stop, some rank's rank-local work failed): one 4-element MAX all-reduce and one host sync
    per step."""
    flags = torch.stack([loss_bad.float().reshape(()), grad_bad.float().reshape(()),
                         torch.tensor(float(stop), device=loss_bad.device),
                         torch.tensor(float(failed), device=loss_bad.device)])
    if distributed:
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    a, b, c, d = flags.tolist()
    return a > 0, b > 0, c > 0, d > 0


def agreed_stop(signals: StopSignals, device: torch.device, distributed: bool) -> str | None:
    """Outside a step (after validation, which every rank runs at the same step): whether any
    rank got a preemption signal, agreed by one small all-reduce; the signal's name, or
    "a signal on another rank", or None."""
    flag = torch.tensor(float(signals.requested is not None), device=device)
    if distributed:
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    if flag.item() > 0:
        return signals.requested or "a signal on another rank"
    return None


# ---------------------------------------------------------------- signals


def signal_numbers(names: Sequence[str]) -> list[int]:
    out = []
    for n in names:
        if n.lower() == "none":
            continue
        name = n.upper() if n.upper().startswith("SIG") else f"SIG{n.upper()}"
        if not hasattr(signal, name):
            raise ValueError(f"--preempt-signals: unknown signal {n!r}")
        out.append(int(getattr(signal, name)))
    return out


class StopSignals:
    """Context manager: the given signals (and SIGINT) set ``requested`` instead of ending the
    process; the loop reads it at each step boundary. A second SIGINT raises
    KeyboardInterrupt at once. While ``in_setup`` (before the first step: nothing to save) a
    signal raises ``PreemptedDuringSetup`` at once instead of waiting for the first boundary.
    Previous handlers come back on exit. Only in the main thread (elsewhere Python cannot
    install handlers, and nothing is installed)."""

    def __init__(self, signums: Sequence[int]) -> None:
        self.signums = sorted(set(signums) | {int(signal.SIGINT)})
        self.requested: str | None = None
        self.in_setup = False
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.in_setup:
            from .preemption import PreemptedDuringSetup

            self.in_setup = False  # raised once: cleanup code is not interrupted again
            self.requested = name
            raise PreemptedDuringSetup(name)
        if signum == signal.SIGINT and self.requested == "SIGINT":
            raise KeyboardInterrupt
        if self.requested is None:
            self.requested = name
            log.warning("received %s: stopping at the end of this step, writing a checkpoint",
                        name)

    def __enter__(self) -> StopSignals:
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in self.signums:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}


# ---------------------------------------------------------------- ranks agree


def cache_key(cache_dir: str | None) -> str | None:
    """sha256 of the teacher cache's index.json (what it holds and was made with)."""
    if not cache_dir:
        return None
    try:
        with open(os.path.join(cache_dir, "index.json"), "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()[:16]
    except OSError:
        return None


def check_ranks_agree(view: dict[str, Any]) -> None:
    """Every rank passes its view of the run; raise the same RankMismatchError on every rank if
    any entry differs (one all_gather_object; no-op in one process)."""
    from ..utils import dist as du

    views = du.all_gather_objects(view)
    if len(views) < 2:
        return
    diffs = []
    for k in view:
        vals = [v.get(k) for v in views]
        if any(v != vals[0] for v in vals[1:]):
            groups: dict[str, list[int]] = {}
            for r, v in enumerate(vals):
                groups.setdefault(repr(v), []).append(r)
            diffs.append(f"{k}: " + ", ".join(
                f"{v} on rank{'s' if len(rs) > 1 else ''} {','.join(map(str, rs))}"
                for v, rs in groups.items()))
    if diffs:
        raise RankMismatchError("ranks disagree about the run, stopping before the first "
                                "step (same --data, options and files on every rank?): "
                                + "; ".join(diffs))
