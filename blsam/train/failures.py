"""Rank-local failures that end every rank together, at the next step boundary.

Why: some work runs on rank 0 alone (the background checkpoint writer, ``metrics.jsonl`` and
TensorBoard, the profiler's trace export). If its error were raised where it happens, rank 0
would leave the step while ranks 1..N enter DDP's all-reduce, and with NCCL nobody exits
until ``--dist-timeout`` (``destroy_process_group`` on the failing rank waits for its peers).
Here such an error is *noted* (``LocalFailures.guard``; its traceback logged on that rank) and
travels as the fourth flag of the step's one all-reduce (``blsam.train.cluster.step_flags``);
every rank then gathers the message and raises the same ``RankFailure`` naming the rank, and
the CLI exits 1 on every rank within seconds. ``end_process_group`` destroys the process group
only after such an agreed exit (torchtitan does the same: destroy only on success).
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch

log = logging.getLogger("blsam.train")

EXIT_FAILED = 1  # a failure every rank agreed on (disk full, ...): one line naming the rank


class RankFailure(RuntimeError):
    """A rank-local failure that every rank learnt at the same step boundary."""

    all_ranks = True  # every rank raises it: the CLI may wait for the others, then destroy


class LocalFailures:
    """The first error of this rank's rank-local work, held until the next step boundary."""

    def __init__(self) -> None:
        self.error: str | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None

    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Run rank-local work; an ``Exception`` in it is noted (not raised) with ``what``."""
        try:
            yield
        except Exception as e:  # KeyboardInterrupt etc. still end the rank at once
            if self.error is None:
                self.error = f"{what}: {type(e).__name__}: {e}"
                log.error("%s failed on this rank; every rank stops at the next step "
                          "boundary", what, exc_info=True)


def raise_agreed(failures: LocalFailures, distributed: bool) -> None:
    """Called by every rank once the step flags said some rank failed: gather the messages
    (a collective every rank reaches) and raise the lowest failing rank's as ``RankFailure``."""
    from ..utils import dist as du

    msgs = du.all_gather_objects(failures.error) if distributed else [failures.error]
    for rank, msg in enumerate(msgs):
        if msg is not None:
            raise RankFailure(f"on rank {rank}: {msg} (every rank stopped at the same step; "
                              f"rerun with --resume auto once it is fixed)")
    raise RankFailure("a rank reported a failure but sent no message")


def check_boundary(failures: LocalFailures, distributed: bool, device: torch.device) -> None:
    """A boundary outside the step (after the last step): one 1-value all-reduce of the flag."""
    flag = torch.tensor(float(failures.failed), device=device)
    if distributed:
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    if flag.item() > 0:
        raise_agreed(failures, distributed)


def agreed_exit(exc: BaseException | None) -> bool:
    """Whether every rank ends the same way: success (None) or an error all ranks raise."""
    if exc is None:
        return True
    from .cluster import NonFiniteError

    return isinstance(exc, NonFiniteError) or bool(getattr(exc, "all_ranks", False))


def end_process_group(agreed: bool) -> None:
    """Destroy the process group after an agreed exit (every peer reaches it); otherwise leave
    it: NCCL's destroy would wait for peers stuck in a collective, while a process that just
    exits aborts its communicators and torchrun stops the others."""
    from ..utils import dist as du

    if agreed:
        du.cleanup()
