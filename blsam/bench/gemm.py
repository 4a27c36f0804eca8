"""This machine's matmul rates: one ViT-B MLP matmul per dtype, and every GEMM of one b_t
forward replayed (burst and sustained rates)."""
from __future__ import annotations

import time

import torch

from blsam import blsam_model_registry


def gemm_shapes(img_size: int, student: str = "b_t") -> dict[tuple, int]:
    """(M, K, N) -> count of the matmuls ``student`` runs in one fp32 forward at ``img_size``."""
    from torch.utils._python_dispatch import TorchDispatchMode

    counts: dict[tuple, int] = {}

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            a = b = None
            op = func.overloadpacket  # .default and .out (projections written into buffers)
            if op is torch.ops.aten.linear:  # weight is (N, K)
                a, b = args[0], args[1].t()
            elif op in (torch.ops.aten.mm, torch.ops.aten.matmul, torch.ops.aten.bmm):
                a, b = args[0], args[1]
            elif op is torch.ops.aten.addmm:
                a, b = args[1], args[2]
            if a is not None:
                m = a.numel() // a.shape[-1]  # batch dims folded into M
                if b.dim() > 2:  # batched matmul: fold b's batch into the count
                    m = a.shape[-2]
                    n_batch = b.numel() // (b.shape[-2] * b.shape[-1])
                else:
                    n_batch = 1
                key = (m, a.shape[-1], b.shape[-1])
                counts[key] = counts.get(key, 0) + n_batch
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    enc = blsam_model_registry[student](img_size=img_size).eval().image_encoder
    with torch.inference_mode(), Log():
        enc(torch.randn(1, 3, img_size, img_size))
    return counts


class GemmReplay:
    """Every dense GEMM of one b_t fp32 forward, replayed back to back with ``torch.mm``.

    Called between an encoder's timed forwards (CPU fp32 rows), it measures the GEMM rate this
    machine *sustains* at that moment on b_t's own matmul shapes (fresh outputs, as in the
    model). A shared VM drifts by tens of percent within minutes and bursts above what it
    sustains, so each forward is compared with the replays just before and after it, not with
    one probe taken at the start of the run."""

    def __init__(self, img_size: int, student: str = "b_t") -> None:
        counts = gemm_shapes(img_size, student)
        g = torch.Generator().manual_seed(0)
        # weights stored (N, K) and used transposed, like nn.Linear's
        self.ops = [(torch.randn(m, k, generator=g), torch.randn(n, k, generator=g), c)
                    for (m, k, n), c in counts.items()]
        self.gmacs = sum(c * m * k * n for (m, k, n), c in counts.items()) / 1e9

    def __call__(self) -> float:
        """Seconds one forward's worth of GEMMs takes now."""
        t0 = time.perf_counter()
        for a, w, c in self.ops:
            for _ in range(c):
                torch.mm(a, w.t())
        return time.perf_counter() - t0


def measure_gemm_rate(replay: GemmReplay, repeats: int = 3) -> dict[str, float]:
    """This machine's *burst* dense fp32 GEMM rate on the matmul shapes b_t uses (GMAC/s).

    Each of the replay's distinct (M, K, N) is timed alone (best of ``repeats``); the rate is
    the MAC-weighted one: all of b_t's GEMM MACs over the time they take at those speeds. A
    peak: the "of GEMM rate" column uses the sustained rate of the whole replay instead."""
    total_s = sum(c * best_mm_seconds(a, w, repeats) for a, w, c in replay.ops)
    return {"gemm_burst_gmacs_per_s": replay.gmacs / total_s, "gemm_gmacs": replay.gmacs,
            "gemm_shapes": len(replay.ops), "gemm_operands": "x @ W.t(), W (N, K) as nn.Linear"}


def best_mm_seconds(a: torch.Tensor, w: torch.Tensor, repeats: int) -> float:
    """Best of ``repeats`` timings of ``a @ w.t()`` (``w`` stored (N, K), as nn.Linear's),
    after one untimed call."""
    torch.mm(a, w.t())
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, w.t())
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_rate(dtype: torch.dtype, m: int, repeats: int = 3) -> float:
    """GMAC/s of one (m, 768) x (768, 3072) matmul (ViT-B's MLP) in ``dtype``, best of 3."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(m, 768, generator=g).to(dtype)
    w = torch.randn(3072, 768, generator=g).to(dtype)
    return m * 768 * 3072 / best_mm_seconds(a, w, repeats) / 1e9
