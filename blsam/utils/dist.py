"""torchrun-aware process-group helpers (nccl on GPU, gloo on CPU); no-ops in one process."""
from __future__ import annotations

import contextlib
import datetime
import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

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


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels (CUDA runs them asynchronously), so a clock read
    after it times what they did; a no-op elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pick_device(device: str | None, world: int, local: int) -> torch.device:
    """This process's device. "cuda:N" is honoured in one process; under torchrun "cuda" is
    ``cuda:LOCAL_RANK``, except with one visible GPU per process (``srun --gpus-per-task 1``,
    ``CUDA_VISIBLE_DEVICES`` per rank), where it is ``cuda:0``."""
    want_cuda = torch.cuda.is_available() if device in (None, "auto") else device.startswith("cuda")
    if not want_cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but CUDA is not available")
    asked = torch.device(device) if device not in (None, "auto") else torch.device("cuda")
    n = torch.cuda.device_count()
    if asked.index is not None and world == 1:
        index = asked.index
    elif n == 1:
        index = 0
    else:
        index = local
    if index >= n:
        raise RuntimeError(f"device cuda:{index} asked for (--device {device}, LOCAL_RANK "
                           f"{local}), but only {n} GPU(s) are visible")
    return torch.device("cuda", index)


def init_distributed(device: str | None = None, backend: str | None = None,
                     timeout_min: float | None = None) -> DistInfo:
    """Join the torchrun process group if launched by torchrun, and pick this rank's device.

    ``device``: "cpu", "cuda", "cuda:N" or None (cuda when available). ``timeout_min``: how
    long a collective may wait for the slowest rank before the process group gives up (NCCL's
    watchdog and gloo alike; None: torch's default)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, world, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        kw = {} if timeout_min is None else {"timeout": datetime.timedelta(minutes=timeout_min)}
        kw.update(_attempt_store(rank, world, kw.get("timeout")))
        dist.init_process_group(backend or ("nccl" if dev.type == "cuda" else "gloo"), **kw)
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


def _attempt_store(rank: int, world: int, timeout: datetime.timedelta | None) -> dict:
    """Under torchrun, the process group's store keys prefixed by the restart attempt.

    Why: torchrun's agent keeps one store for all attempts (``--max-restarts``); with env://
    the restarted ranks publish their addresses under the same keys as the killed ones, and a
    rank that reads a peer's key before the peer rewrote it connects to a dead address ("Gloo
    connectFullMesh failed ... Connection refused", or NCCL's socketPollConnect). A prefix per
    attempt (TORCHELASTIC_RESTART_COUNT) makes every attempt read only its own keys."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if attempt is None or not host or not port:
        return {}
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    store = dist.TCPStore(host, int(port), world, is_master=not agent and rank == 0,
                          timeout=timeout or datetime.timedelta(minutes=30),
                          multi_tenant=not agent)
    return {"store": dist.PrefixStore(f"blsam/attempt_{attempt}", store), "rank": rank,
            "world_size": world}


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


_MAIN_WRITES = [0]  # how many ``main_writes`` blocks this process has entered (same on all ranks)


def default_store() -> Any:
    """The process group's key-value store (a private torch API: None where it is missing, and
    callers fall back to collectives)."""
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:
        return None


@contextlib.contextmanager
def main_writes(what: str, timeout_min: float) -> Iterator[bool]:
    """A block only rank 0 runs (file writes), that the other ranks wait for outside any
    collective: yields whether this is rank 0.

    Why: a barrier after rank 0's write (or the next collective) waits as long as the write
    takes, and a large checkpoint on a slow file system can take longer than the process-group
    timeout (``--dist-timeout``), which then kills the run. Here rank 0 sets a key in the
    process group's store when the block ends (or the error's message, if it raised) and the
    others wait for that key with their own ``timeout_min``. In one process this just yields
    True."""
    if not (dist.is_available() and dist.is_initialized()):
        yield True
        return
    _MAIN_WRITES[0] += 1
    key = f"blsam/main_writes/{_MAIN_WRITES[0]}"
    store = default_store()
    if store is None:  # no store to wait on: a plain barrier after the block
        yield dist.get_rank() == 0
        barrier()
        return
    if dist.get_rank() == 0:
        try:
            yield True
        except BaseException as e:
            store.set(key, f"error: {type(e).__name__}: {e}")
            raise
        store.set(key, "ok")
        return
    yield False
    try:
        store.wait([key], datetime.timedelta(minutes=timeout_min))
    except Exception as e:  # the store's timeout (DistStoreError), or rank 0's store gone
        raise RuntimeError(f"rank 0 did not finish {what} within {timeout_min:g} minutes "
                           f"(--write-timeout): {e}") from e
    status = store.get(key).decode()
    if status != "ok":
        raise RankError(f"on rank 0, {what}: {status[len('error: '):]}")


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (just ``[obj]`` in one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class RankError(RuntimeError):
    """Another rank's error, when its exception type cannot be rebuilt here."""


def _portable(err: BaseException, rank: int) -> tuple[Any, str]:
    """(exception type, message) that survive pickling, the message naming the rank."""
    msg = f"on rank {rank}: {err}"
    try:
        pickle.loads(pickle.dumps(type(err)))
        return type(err), msg
    except Exception:  # a local class: fall back to the message
        return RankError, f"{type(err).__name__} {msg}"


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
