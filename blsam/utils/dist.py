"""torchrun-aware process-group helpers (nccl on GPU, gloo on CPU); no-ops in one process."""
from __future__ import annotations

import contextlib
import os
import pickle
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: Optional[str] = None, backend: Optional[str] = None) -> DistInfo:
    """Join the torchrun process group if launched by torchrun, and pick this rank's device.

    ``device``: "cpu", "cuda" or None (cuda when available).
    """
    want_cuda = torch.cuda.is_available() if device in (None, "auto") else device.startswith("cuda")
    if want_cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but CUDA is not available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if want_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if want_cuda else "gloo"))
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_gather_objects(obj: Any) -> List[Any]:
    """Every rank's ``obj`` in rank order (just ``[obj]`` in one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class RankError(RuntimeError):
    """Another rank's error, when its exception type cannot be rebuilt here."""


def _portable(err: BaseException, rank: int) -> Tuple[Any, str]:
    """(exception type, message) that survive pickling, the message naming the rank."""
    msg = f"on rank {rank}: {err}"
    try:
        pickle.loads(pickle.dumps(type(err)))
        return type(err), msg
    except Exception:  # a local class: fall back to the message
        return RankError, f"{type(err).__name__} {msg}"


@contextlib.contextmanager
def fail_together() -> Iterator[None]:
    """Run a block on every rank; if it raises on any rank, it raises on every rank.

    Why: a rank that fails alone (a corrupt image in its shard, a full disk) would otherwise
    leave the others waiting in the next collective until the process group times out. Every
    rank reaches one small ``all_gather_object`` at the end of the block, failed or not, and all
    raise the lowest failing rank's error (same type, message prefixed with the rank). In one
    process this is a no-op and errors keep their traceback.
    """
    if not (dist.is_available() and dist.is_initialized()):
        yield
        return
    err: Optional[BaseException] = None
    try:
        yield
    except Exception as e:  # KeyboardInterrupt etc. still end this rank at once
        err = e
    rank = dist.get_rank()
    status = all_gather_objects(None if err is None else _portable(err, rank))
    for r, st in enumerate(status):
        if st is not None:
            cls, msg = st
            try:
                exc = cls(msg)
            except Exception:
                exc = RankError(msg)
            exc.all_ranks = True  # a CLI may print it, then ``barrier()``, then exit
            raise exc from err
    return


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
