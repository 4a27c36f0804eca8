"""What the machine offers and does: ISA, allocator settings, minor page faults, peak RSS,
load average, the environment record of a run."""
from __future__ import annotations

import ctypes
import os
import platform
import threading
import time

import torch

from .config import BenchConfig


def cpu_isa() -> dict[str, object]:
    """What the CPU offers for these kernels: AVX2 / AVX-512 / AMX, and native bf16 (AMX-BF16
    or AVX512-BF16; without either, torch emulates bf16 matmuls, far slower than fp32)."""
    flags: set = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    has = {k: k in flags for k in ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")}
    isa = "AMX" if has["amx_tile"] else "AVX-512" if has["avx512f"] else (
        "AVX2" if has["avx2"] else "other")
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except AttributeError:
        capability = "unknown"
    return {"isa": isa, "isa_flags": [k for k, v in has.items() if v],
            "torch_cpu_capability": capability,
            "native_bf16": has["amx_bf16"] or has["avx512_bf16"]}


# glibc settings of the "tuned" allocator, given to a fresh process: no mmap'd chunks, no
# trimming, so freed memory is reused without page faults (mallopt() in a running process,
# after torch has started, still left ~2/3 of the official encoder's faults on torch 2.14)
GLIBC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776"


def tunables_active() -> bool:
    return "glibc.malloc.mmap_max=0" in os.environ.get("GLIBC_TUNABLES", "")


def tune_glibc_malloc() -> bool:
    """Keep freed memory in the process (glibc): fresh multi-MB buffers otherwise cost page
    faults on every forward, which slows the official encoder more than ours."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**40))


class RssPeak:
    """Peak resident memory above the level at start, sampled every 2 ms (CPU runs)."""

    def __init__(self) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self.peak = 0
        self._stop = threading.Event()

    def _rss(self) -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self.page
        except OSError:
            return 0

    def __enter__(self) -> RssPeak:
        self.base = self._rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss() - self.base)
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss() - self.base)


def minflt() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "unknown"


def environment(cfg: BenchConfig, malloc_tuned: bool) -> dict[str, object]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    env: dict[str, object] = {
        "cpu": cpu, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(),
        "img_size": cfg.img_size, "warmup": cfg.warmup, "repeats": cfg.repeats,
        "glibc_malloc_tuned": malloc_tuned, "loadavg_start": loadavg(),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
    }
    env.update(cpu_isa())
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    return env


def child_env() -> dict[str, str]:
    """The parent's environment, with this checkout first on the path (``-m`` looks there)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env
