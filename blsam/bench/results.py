"""One benchmark row (raw samples kept), its summary statistics and its ratios to the
reference rows of the same run (``relative_to``); written atomically."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field


@dataclass
class Result:
    model: str
    family: str
    kind: str
    keep_ratio: float | None
    device: str
    dtype: str
    batch_size: int
    gflops_paper_sam: float
    gflops_full_encoder: float
    latency_ms_median: float = float("nan")
    latency_ms_min: float = float("nan")
    latency_ms_max: float = float("nan")
    latency_ms_iqr: float = float("nan")
    images_per_s: float = float("nan")
    peak_mem_mib: float = float("nan")
    times_ms: list[float] = field(default_factory=list)
    wave: int | None = None  # the schedule's wave (rows of one wave were interleaved)
    ratio_latency_vs_official: float = float("nan")
    ratio_latency_vs_fused: float = float("nan")
    ratio_gflops_full_vs_official: float = float("nan")
    gmacs_per_s: float = float("nan")  # full encoder GMACs x batch / median latency
    # of the dense GEMM rate this machine sustained around each timed run (median over runs)
    frac_of_gemm_rate: float = float("nan")
    frac_of_burst_gemm_rate: float = float("nan")  # of the best-of-3 per-shape (peak) rate
    gemm_gmacs_per_s_runs: list[float] = field(default_factory=list)  # sustained, per run
    skip_padding: bool = False
    photo: str | None = None  # set_image rows: which photo (aspect ratio)
    padding_queries: float = float("nan")  # routed tokens on all-padding patches, all stages
    routed_queries: float = float("nan")  # routed tokens, all stages
    error: str | None = None
    backend: str = "eager"
    malloc: str = "default"  # glibc allocator: "default" or "tuned" (no page faults)
    minor_faults_per_forward: float = float("nan")  # median over the timed runs
    bf16: str | None = None  # bf16 rows: "native" (AMX / AVX512-BF16) or "emulated"
    ratio_latency_vs_timm: float = float("nan")
    ratio_latency_vs_eager: float = float("nan")  # ONNX Runtime rows: / the same model eager
    ratio_latency_vs_onnx_official: float = float("nan")  # ONNX rows: / official in ORT
    ratio_latency_vs_onnx_fused: float = float("nan")  # ONNX rows: / fused vanilla in ORT
    worker_pid: int | None = None  # the process that ran it (--isolation process)
    worker_tuned: bool | None = None  # whether that process ran with GLIBC_TUNABLES tuned
    build_s: float = float("nan")  # worker: build + FLOP count (s), before the warm-up
    warmup_s: float = float("nan")  # worker: the --warmup forwards (s)
    attention_path: str | None = None  # attention kernel for this device/dtype, if known
    # --profile-ops: self CPU ms of one forward per op class (gemm, attention, ...)
    op_profile: dict[str, float] | None = None


def quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo, hi = int(pos), min(int(pos) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def relative_to(row: Result, ref: Result | None, name: str = "latency_ms_median") -> float:
    """``row``'s ``name`` over ``ref``'s (nan without a reference): every ratio of a run."""
    if ref is None:
        return math.nan
    return getattr(row, name) / getattr(ref, name)


def summarise(res: Result, times_ms: list[float], batch: int) -> None:
    """Keep the raw samples and their summary: median, min, max, IQR, images/s."""
    res.times_ms = [round(v, 3) for v in times_ms]
    res.latency_ms_median = statistics.median(times_ms)
    res.latency_ms_min, res.latency_ms_max = min(times_ms), max(times_ms)
    res.latency_ms_iqr = quantile(times_ms, 0.75) - quantile(times_ms, 0.25)
    res.images_per_s = batch / (res.latency_ms_median / 1e3)


def add_ratios(results: list[Result]) -> None:
    """Ratios to the official, fused and timm vanilla encoders (eager) of the same
    family/device/dtype/batch and allocator; ONNX Runtime rows also to the same model eager
    and to the official encoder in ONNX Runtime."""
    ref: dict[tuple, Result] = {}
    for r in results:
        if r.error is None:
            ref[(r.model, r.backend, r.malloc, r.device, r.dtype, r.batch_size)] = r
        if r.kind in ("official", "fused", "timm") and r.error is None:
            ref[(r.kind, r.backend, r.family, r.device, r.dtype, r.batch_size, r.malloc)] = r
    for r in results:
        if r.error is not None:
            continue
        key = (r.family, r.device, r.dtype, r.batch_size, r.malloc)
        off = ref.get(("official", "eager") + key)
        r.ratio_latency_vs_timm = relative_to(r, ref.get(("timm", "eager") + key))
        if r.backend == "onnxruntime":
            r.ratio_latency_vs_eager = relative_to(r, ref.get((
                r.model.replace("[ort]", ""), "eager", r.malloc, r.device, r.dtype,
                r.batch_size)))
            r.ratio_latency_vs_onnx_official = relative_to(
                r, ref.get(("official", "onnxruntime") + key))
            r.ratio_latency_vs_onnx_fused = relative_to(r, ref.get(("fused", "onnxruntime") + key))
        r.ratio_latency_vs_official = relative_to(r, off)
        r.ratio_gflops_full_vs_official = relative_to(r, off, "gflops_full_encoder")
        r.ratio_latency_vs_fused = relative_to(r, ref.get(("fused", "eager") + key))


def from_dicts(rows: list[dict]) -> list[Result]:
    """Rows read back from JSON (a worker's reply, a results file)."""
    return [Result(**r) for r in rows]
