"""Side-by-side speed benchmark: official SAM encoder vs our fused one vs bLViT at several keep ratios.

Everything runs in one process, so the headline is the ratio to the official encoder measured
in the same run (absolute times drift between machines and with load). Per model: GFLOPs in the
paper's convention (whole SAM, one prompt) and in the full one (encoder, attention included),
latency median and spread after warm-up, peak memory and images/s, for each device, dtype and
batch size asked for.

    python tools/benchmark.py --quick                       # ViT-B family, fp32, batch 1
    python tools/benchmark.py --families b h --dtypes fp32 bf16 --batch-sizes 1 8

Weights are random: latency does not depend on them (k tokens per window are routed whatever
the scores are), and no checkpoint download is needed.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from blsam import blsam_model_registry  # noqa: E402
from blsam.build_blsam import build_vanilla_sam  # noqa: E402
from blsam.flops import count_flops  # noqa: E402

from blsam.specs import FAMILIES  # noqa: E402  family -> (vanilla SAM, bLViT student)
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ModelSpec:
    """One benchmarked encoder: ``kind`` is official, fused or blsam."""

    name: str
    family: str
    kind: str
    keep_ratio: Optional[float] = None

    def build(self, img_size: int) -> torch.nn.Module:
        vanilla, student = FAMILIES[self.family]
        if self.kind == "official":
            return build_vanilla_sam(vanilla, img_size=img_size)
        if self.kind == "fused":
            return build_vanilla_sam(vanilla, img_size=img_size, fused=True)
        return blsam_model_registry[student](img_size=img_size, keep_ratio=self.keep_ratio)


@dataclass
class Result:
    model: str
    family: str
    kind: str
    keep_ratio: Optional[float]
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
    times_ms: List[float] = field(default_factory=list)
    ratio_latency_vs_official: float = float("nan")
    ratio_latency_vs_fused: float = float("nan")
    ratio_gflops_full_vs_official: float = float("nan")
    gmacs_per_s: float = float("nan")  # full encoder GMACs x batch / median latency
    # of the dense GEMM rate this machine sustained around each timed run (median over runs)
    frac_of_gemm_rate: float = float("nan")
    frac_of_burst_gemm_rate: float = float("nan")  # of the best-of-3 per-shape (peak) rate
    gemm_gmacs_per_s_runs: List[float] = field(default_factory=list)  # sustained, per run
    skip_padding: bool = False
    photo: Optional[str] = None  # set_image rows: which photo (aspect ratio)
    padding_queries: float = float("nan")  # routed tokens on all-padding patches, all stages
    routed_queries: float = float("nan")  # routed tokens, all stages
    error: Optional[str] = None


def model_specs(families: Sequence[str], keep_ratios: Sequence[float]) -> List[ModelSpec]:
    specs = []
    for fam in families:
        vanilla, student = FAMILIES[fam]
        specs.append(ModelSpec(vanilla, fam, "official"))
        specs.append(ModelSpec(f"{vanilla}_sdpa", fam, "fused"))
        for r in keep_ratios:
            specs.append(ModelSpec(f"{student}@{r:g}", fam, "blsam", r))
    return specs


def tune_glibc_malloc() -> bool:
    """Keep freed memory in the process (glibc): fresh multi-MB buffers otherwise cost page
    faults on every forward, which slows the official encoder more than ours."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**40))


class _RssPeak:
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

    def __enter__(self) -> "_RssPeak":
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


def time_encoder(
    encoder: torch.nn.Module, device: torch.device, dtype: Optional[torch.dtype],
    batch_size: int, warmup: int, repeats: int, between: Optional[Callable[[], float]] = None,
) -> Dict[str, object]:
    """Latency of ``encoder`` on a (B, 3, S, S) input; returns times (ms) and peak memory (MiB).

    Peak memory (CUDA only) is what the forward pass allocates on top of the weights.
    ``between`` (CPU): called before the first timed run and after every one (a GEMM replay);
    its results come back as ``between_s`` (repeats + 1 values).
    """
    size = encoder.img_size
    x = torch.randn(batch_size, 3, size, size, device=device)
    cuda = device.type == "cuda"

    def run() -> None:
        with torch.inference_mode(), torch.autocast(
            device.type, dtype=dtype or torch.float32, enabled=dtype is not None
        ):
            encoder(x)
        if cuda:
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        run()
    gc.collect()
    times = []
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        for _ in range(repeats):
            t0 = time.perf_counter()
            run()
            times.append((time.perf_counter() - t0) * 1e3)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        gaps = [between()] if between else []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run()
            times.append((time.perf_counter() - t0) * 1e3)
            if between:
                gaps.append(between())
        peak = float("nan")  # measured in a fresh process, see cpu_peak_memory
        return {"times": times, "peak": peak, "between_s": gaps}
    return {"times": times, "peak": peak}


def cpu_peak_memory(spec: ModelSpec, args: argparse.Namespace, dtype: str, batch: int) -> float:
    """Peak resident-memory growth (MiB) of one CPU forward, measured in a fresh process.

    In this process the allocator keeps memory freed by earlier models and runs, so the RSS
    growth here would say more about the run order than about the model.
    """
    import subprocess

    cmd = [sys.executable, os.path.abspath(__file__), "--memory-probe", spec.name,
           "--img-size", str(args.img_size), "--threads", str(args.threads),
           "--dtypes", dtype, "--batch-sizes", str(batch)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe failed: {out.stderr.strip().splitlines()[-1:]}")
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"])


def memory_probe(args: argparse.Namespace) -> None:
    """Child side of ``cpu_peak_memory``: build one encoder, run one forward, print the peak."""
    torch.set_num_threads(args.threads)
    name = args.memory_probe
    keep = [float(name.split("@")[1])] if "@" in name else []
    specs = {s.name: s for s in model_specs(sorted(FAMILIES), keep)}
    enc = specs[name].build(args.img_size).eval().image_encoder
    x = torch.randn(args.batch_sizes[0], 3, args.img_size, args.img_size)
    dtype = DTYPES[args.dtypes[0]]
    gc.collect()
    with _RssPeak() as mem, torch.inference_mode(), torch.autocast(
        "cpu", dtype=dtype or torch.float32, enabled=dtype is not None
    ):
        enc(x)
    print(json.dumps({"peak_mib": mem.peak / 2**20}))


def _quantile(xs: List[float], q: float) -> float:
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo, hi = int(pos), min(int(pos) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def gemm_shapes(img_size: int, student: str = "b_t") -> Dict[tuple, int]:
    """(M, K, N) -> count of the matmuls ``student`` runs in one fp32 forward at ``img_size``."""
    from torch.utils._python_dispatch import TorchDispatchMode

    counts: Dict[tuple, int] = {}

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


def measure_gemm_rate(replay: GemmReplay, repeats: int = 3) -> Dict[str, float]:
    """This machine's *burst* dense fp32 GEMM rate on the matmul shapes b_t uses (GMAC/s).

    Each of the replay's distinct (M, K, N) is timed alone (best of ``repeats``); the rate is
    the MAC-weighted one: all of b_t's GEMM MACs over the time they take at those speeds. A
    peak: the "of GEMM rate" column uses the sustained rate of the whole replay instead."""
    total_s = 0.0
    for a, w, c in replay.ops:
        torch.mm(a, w.t())
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(a, w.t())
            best = min(best, time.perf_counter() - t0)
        total_s += c * best
    return {"gemm_burst_gmacs_per_s": replay.gmacs / total_s, "gemm_gmacs": replay.gmacs,
            "gemm_shapes": len(replay.ops), "gemm_operands": "x @ W.t(), W (N, K) as nn.Linear"}


PHOTOS = {  # aspect -> (skimage.data image, crop rows/cols to that aspect ratio)
    "1:1": "astronaut", "4:3": "chelsea", "16:9": "coffee",
}


def photo(aspect: str):
    """A real photo from scikit-image's bundled data, centre-cropped to ``aspect``."""
    import numpy as np
    from skimage import data

    img = getattr(data, PHOTOS[aspect])()
    h, w = img.shape[:2]
    aw, ah = (int(v) for v in aspect.split(":"))
    if w * ah > h * aw:  # too wide: crop columns
        nw = h * aw // ah
        img = img[:, (w - nw) // 2:(w - nw) // 2 + nw]
    else:
        nh = w * ah // aw
        img = img[(h - nh) // 2:(h - nh) // 2 + nh]
    return np.ascontiguousarray(img)


def photo_rows(args: argparse.Namespace) -> List[Result]:
    """``SamPredictor.set_image`` on real photos of three aspect ratios: official ViT-B vs b_t
    with the paper's routing and with ``skip_padding``; counts P-block queries on padding."""
    from segment_anything import SamPredictor

    rows: List[Result] = []
    vanilla, student = FAMILIES[args.families[0]]
    variants = [(vanilla, "official", None, False)]
    for r in args.keep_ratios:
        variants += [(f"{student}@{r:g}", "blsam", r, False),
                     (f"{student}@{r:g}+skip_padding", "blsam", r, True)]
    for name, kind, keep, skip in variants:
        torch.manual_seed(0)
        if kind == "official":
            sam = build_vanilla_sam(vanilla, img_size=args.img_size).eval()
        else:
            sam = blsam_model_registry[student](img_size=args.img_size, keep_ratio=keep,
                                               skip_padding=skip).eval()
        full = count_flops(sam, "full", part="image_encoder").total
        predictor = SamPredictor(sam)
        for aspect in args.photos:
            img = photo(aspect)
            with torch.inference_mode():
                for _ in range(args.warmup):
                    predictor.set_image(img)
                times = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    predictor.set_image(img)
                    times.append((time.perf_counter() - t0) * 1e3)
            gflops = full
            if kind == "blsam":  # padding-aware routing's cost depends on the photo
                x = torch.as_tensor(predictor.transform.apply_image(img)).permute(2, 0, 1)
                x = sam.preprocess(x[None].float())
                gflops = count_flops(sam, "full", part="image_encoder", images=x).total
            res = Result(name, "b", kind, keep, "cpu", "fp32", 1, float("nan"), gflops,
                         skip_padding=skip, photo=f"{aspect} {PHOTOS[aspect]} {img.shape[1]}x"
                                                  f"{img.shape[0]}")
            res.times_ms = [round(v, 3) for v in times]
            res.latency_ms_median = statistics.median(times)
            res.latency_ms_min, res.latency_ms_max = min(times), max(times)
            res.images_per_s = 1e3 / res.latency_ms_median
            if kind == "blsam":
                h, w = predictor.input_size
                g = args.img_size // 16
                content = torch.zeros(g, g, dtype=torch.bool)
                content[: -(-h // 16), : -(-w // 16)] = True
                masks = [s["mask"][0] for s in sam.image_encoder.last_routing]
                res.padding_queries = float(sum(int((m & ~content).sum()) for m in masks))
                res.routed_queries = float(sum(int(m.sum()) for m in masks))
            rows.append(res)
        del sam, predictor
        gc.collect()
    off = {r.photo: r for r in rows if r.kind == "official"}
    for r in rows:
        r.ratio_latency_vs_official = r.latency_ms_median / off[r.photo].latency_ms_median
    return rows


def photo_table(rows: List[Result]) -> str:
    lines = [
        "`SamPredictor.set_image` on real photos (skimage.data, centre-cropped to the aspect "
        "ratio; SamPredictor resizes the long side to the encoder size and pads with zeros)",
        "",
        "| model | photo | skip_padding | GFLOPs full (this photo) | latency ms (median) "
        "| min–max | latency / official | P-block queries on padding | of all routed |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        frac = r.padding_queries / r.routed_queries  # nan for the official encoder
        lines.append(
            f"| {r.model} | {r.photo} | {r.skip_padding} | {r.gflops_full_encoder:.1f} "
            f"| {r.latency_ms_median:.1f} "
            f"| {r.latency_ms_min:.0f}–{r.latency_ms_max:.0f} "
            f"| {fmt(r.ratio_latency_vs_official)} "
            f"| {fmt(r.padding_queries, 0)} | {fmt(frac)} |")
    return "\n".join(lines) + "\n"


def add_ratios(results: List[Result]) -> None:
    """Ratios to the official and the fused vanilla encoder of the same family/device/dtype/batch."""
    ref: Dict[tuple, Result] = {}
    for r in results:
        if r.kind in ("official", "fused"):
            ref[(r.kind, r.family, r.device, r.dtype, r.batch_size)] = r
    for r in results:
        key = (r.family, r.device, r.dtype, r.batch_size)
        off, fused = ref.get(("official",) + key), ref.get(("fused",) + key)
        if off is not None:
            r.ratio_latency_vs_official = r.latency_ms_median / off.latency_ms_median
            r.ratio_gflops_full_vs_official = r.gflops_full_encoder / off.gflops_full_encoder
        if fused is not None:
            r.ratio_latency_vs_fused = r.latency_ms_median / fused.latency_ms_median


def environment(args: argparse.Namespace, malloc_tuned: bool) -> Dict[str, object]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    env: Dict[str, object] = {
        "cpu": cpu, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(),
        "img_size": args.img_size, "warmup": args.warmup, "repeats": args.repeats,
        "glibc_malloc_tuned": malloc_tuned,
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    return env


def fmt(x: float, nd: int = 2) -> str:
    return "–" if x != x else f"{x:.{nd}f}"


def markdown_table(results: List[Result], env: Dict[str, object]) -> str:
    lines = [
        f"CPU: {env['cpu']} ({env['threads']} threads), torch {env['torch']}, "
        f"{env['img_size']}², warm-up {env['warmup']}, {env['repeats']} timed runs"
        + (f"; GPU: {env['gpu']}" if "gpu" in env else ""),
        "",
        "| model | device | dtype | batch | GFLOPs paper (SAM) | GFLOPs full (encoder) "
        "| full FLOPs / official | latency ms (median) | min–max | img/s | peak MiB "
        "| latency / official | latency / fused | GMAC/s | of GEMM rate | of burst rate |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if r.error:
            lines.append(f"| {r.model} | {r.device} | {r.dtype} | {r.batch_size} | "
                         f"{r.error} |" + " |" * 11)
            continue
        lines.append(
            f"| {r.model} | {r.device} | {r.dtype} | {r.batch_size} | {r.gflops_paper_sam:.1f} "
            f"| {r.gflops_full_encoder:.1f} | {fmt(r.ratio_gflops_full_vs_official)} "
            f"| {r.latency_ms_median:.1f} | {r.latency_ms_min:.0f}–{r.latency_ms_max:.0f} "
            f"| {r.images_per_s:.2f} | {fmt(r.peak_mem_mib, 0)} "
            f"| {fmt(r.ratio_latency_vs_official)} | {fmt(r.ratio_latency_vs_fused)} "
            f"| {fmt(r.gmacs_per_s, 1)} | {fmt(r.frac_of_gemm_rate)} "
            f"| {fmt(r.frac_of_burst_gemm_rate)} |"
        )
    if "gemm_burst_gmacs_per_s" in env:
        sustained = [v for r in results for v in r.gemm_gmacs_per_s_runs]
        span = f"{min(sustained):.1f}–{max(sustained):.1f}" if sustained else "–"
        lines += ["", f"Dense fp32 GEMM rate of this machine on b_t's {env['gemm_shapes']} matmul "
                      f"shapes ({env['gemm_gmacs']:.1f} GMAC per forward). **of GEMM rate**: "
                      f"all of them replayed back to back before and after every timed forward "
                      f"(sustained rate, {span} GMAC/s in this run); each run's GMAC/s over the "
                      f"mean of the replays around it, median over runs (CPU fp32 rows). "
                      f"**of burst rate**: median GMAC/s over the rate of each shape timed alone "
                      f"(best of 3, MAC-weighted) once at the start: "
                      f"{env['gemm_burst_gmacs_per_s']:.1f} GMAC/s."]
    return "\n".join(lines) + "\n"


def plot(results: List[Result], path: str) -> None:
    """Latency and full GFLOPs versus keep ratio, with the vanilla encoders as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r.family, r.device, r.dtype, r.batch_size) for r in results if not r.error})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for g in groups:
        rs = [r for r in results if (r.family, r.device, r.dtype, r.batch_size) == g and not r.error]
        bl = sorted((r for r in rs if r.kind == "blsam"), key=lambda r: r.keep_ratio)
        label = f"{FAMILIES[g[0]][1]} {g[1]} {g[2]} b{g[3]}"
        if not bl:
            continue
        line, = axes[0].plot([r.keep_ratio for r in bl], [r.latency_ms_median for r in bl],
                             "o-", label=label)
        for r in rs:
            if r.kind != "blsam":
                axes[0].axhline(r.latency_ms_median, color=line.get_color(),
                                ls="--" if r.kind == "official" else ":", lw=1)
        if g[1:] == groups[0][1:]:
            axes[1].plot([r.keep_ratio for r in bl], [r.gflops_full_encoder for r in bl], "o-",
                         label=f"{FAMILIES[g[0]][1]} full")
            axes[1].plot([r.keep_ratio for r in bl], [r.gflops_paper_sam for r in bl], "s--",
                         label=f"{FAMILIES[g[0]][1]} paper conv.")
            for r in rs:
                if r.kind == "official":
                    axes[1].axhline(r.gflops_full_encoder, color="gray", ls="--", lw=1)
    axes[0].set(xlabel="keep ratio", ylabel="latency (ms)",
                title="encoder latency (dashed: official SAM, dotted: fused vanilla)")
    axes[1].set(xlabel="keep ratio", ylabel="GFLOPs", title="GFLOPs (dashed gray: official)")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", nargs="+", default=["b"], choices=sorted(FAMILIES),
                   help="b: vit_b vs b_t; h: vit_h vs h_b; tiny: the test pair; the first "
                        "family's student also sets the GEMM replay and --photos rows")
    p.add_argument("--keep-ratios", nargs="+", type=float, default=[0.25, 0.5, 0.75, 1.0])
    p.add_argument("--devices", nargs="+", default=None,
                   help="default: cuda on a GPU node (CPU rows there would only spend node "
                        "time), else cpu; give both for both")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4])
    p.add_argument("--cpu-batch-sizes", nargs="+", type=int, default=None,
                   help="batch sizes on CPU if different (large batches are slow there)")
    p.add_argument("--cpu-dtypes", nargs="+", default=None, choices=sorted(DTYPES),
                   help="dtypes on CPU if different")
    p.add_argument("--img-size", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2, help="CPU threads (fixed, printed)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tune-malloc", action="store_true",
                   help="keep freed memory in the process (glibc mallopt); see README")
    p.add_argument("--quick", action="store_true",
                   help="ViT-B family, keep 0.25 and 1.0, fp32, batch 1, 1 warm-up, 3 runs")
    p.add_argument("--cpu-memory", choices=["probe", "skip"], default="probe",
                   help="probe: CPU peak memory of each model in a fresh process (one forward)")
    p.add_argument("--gemm-rate", choices=["measure", "skip"], default="measure",
                   help="measure this machine's dense fp32 GEMM rate on b_t's matmul shapes: "
                        "burst (each shape alone, once) and sustained (all of them replayed "
                        "around every timed CPU fp32 forward; slower)")
    p.add_argument("--photos", nargs="*", default=[], choices=sorted(PHOTOS),
                   help="also time SamPredictor.set_image on real photos of these aspect "
                        "ratios: official ViT-B vs b_t with and without skip_padding")
    p.add_argument("--skip-models", action="store_true",
                   help="only the --photos rows (and the GEMM rate)")
    p.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    p.add_argument("--output-dir", default="outputs/benchmark")
    args = p.parse_args(argv)
    if args.memory_probe:
        return args
    if args.quick:
        args.families, args.keep_ratios, args.dtypes = ["b"], [0.25, 1.0], ["fp32"]
        args.batch_sizes, args.cpu_batch_sizes, args.cpu_dtypes = [1], [1], ["fp32"]
        args.warmup, args.repeats = 1, 3
    for r in args.keep_ratios:
        if not 0 < r <= 1:
            p.error(f"--keep-ratios must be in (0, 1], got {r}")
    if args.warmup < 0 or args.repeats < 1:
        p.error("--warmup must be >= 0 and --repeats >= 1")
    return args


def default_devices() -> List[str]:
    """The rows to run without ``--devices``: the GPU alone where there is one, else the CPU."""
    return ["cuda"] if torch.cuda.is_available() else ["cpu"]


def main(args: argparse.Namespace) -> List[Result]:
    from tqdm import tqdm

    torch.set_num_threads(args.threads)
    malloc_tuned = tune_glibc_malloc() if args.tune_malloc else False
    devices = args.devices or default_devices()
    if "cuda" in devices and not torch.cuda.is_available():
        raise SystemExit("--devices cuda asked for, but CUDA is not available")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 on every device
    torch.backends.cudnn.allow_tf32 = False
    env = environment(args, malloc_tuned)
    replay: Optional[GemmReplay] = None
    if args.gemm_rate == "measure" and "cpu" in devices:
        replay = GemmReplay(args.img_size, FAMILIES[args.families[0]][1])
        env.update(measure_gemm_rate(replay))
    print(json.dumps(env))
    specs = [] if args.skip_models else model_specs(args.families, args.keep_ratios)
    plan = []
    for dev in devices:
        dtypes = args.cpu_dtypes if dev == "cpu" and args.cpu_dtypes else args.dtypes
        sizes = args.cpu_batch_sizes if dev == "cpu" and args.cpu_batch_sizes else args.batch_sizes
        plan += [(s, dev, d, b) for s in specs for d in dtypes for b in sizes]
    results: List[Result] = []
    flops: Dict[str, tuple] = {}
    key, encoder = None, None  # one model in memory at a time (plan is ordered by model)
    bar = tqdm(plan, desc="benchmark", unit="cfg")
    for spec, dev, dt, bs in bar:
        bar.set_postfix_str(f"{spec.name} {dev} {dt} b{bs}")
        if key != (spec.name, dev):
            key, encoder = (spec.name, dev), None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            torch.manual_seed(0)
            sam = spec.build(args.img_size).eval()
            if spec.name not in flops:
                flops[spec.name] = (count_flops(sam, "paper").total,
                                    count_flops(sam, "full", part="image_encoder").total)
            encoder = sam.image_encoder.to(dev)
            del sam  # the prompt encoder and decoder are not timed
        res = Result(spec.name, spec.family, spec.kind, spec.keep_ratio, dev, dt, bs,
                     *flops[spec.name])
        try:
            m = time_encoder(encoder, torch.device(dev), DTYPES[dt], bs, args.warmup,
                             args.repeats, replay if dev == "cpu" and dt == "fp32" else None)
        except RuntimeError as e:  # e.g. out of memory, or a dtype the device lacks
            res.error = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
            results.append(res)
            continue
        t = m["times"]
        res.times_ms = [round(v, 3) for v in t]
        res.latency_ms_median = statistics.median(t)
        res.latency_ms_min, res.latency_ms_max = min(t), max(t)
        res.latency_ms_iqr = _quantile(t, 0.75) - _quantile(t, 0.25)
        res.images_per_s = bs / (res.latency_ms_median / 1e3)
        res.peak_mem_mib = m["peak"]
        gaps = m.get("between_s") or []
        if gaps:  # each run against the sustained GEMM rate just before and after it
            rates = [replay.gmacs / ((a + b) / 2) for a, b in zip(gaps, gaps[1:])]
            res.gemm_gmacs_per_s_runs = [round(v, 2) for v in rates]
            res.frac_of_gemm_rate = statistics.median(
                res.gflops_full_encoder * bs / (ms / 1e3) / rate for ms, rate in zip(t, rates))
        if dev == "cpu" and args.cpu_memory == "probe":
            try:
                res.peak_mem_mib = cpu_peak_memory(spec, args, dt, bs)
            except RuntimeError as e:
                print(f"warning: {spec.name}: {e}", file=sys.stderr)
        results.append(res)
    add_ratios(results)
    for r in results:
        if r.error is None:
            r.gmacs_per_s = r.gflops_full_encoder * r.batch_size / (r.latency_ms_median / 1e3)
            if r.device == "cpu" and r.dtype == "fp32" and "gemm_burst_gmacs_per_s" in env:
                r.frac_of_burst_gemm_rate = r.gmacs_per_s / env["gemm_burst_gmacs_per_s"]

    photos = photo_rows(args) if args.photos else []
    for r in photos:
        r.gmacs_per_s = r.gflops_full_encoder / (r.latency_ms_median / 1e3)
    os.makedirs(args.output_dir, exist_ok=True)
    table = markdown_table(results, env) if results else ""
    if photos:
        table += "\n" + photo_table(photos)
    with open(os.path.join(args.output_dir, "benchmark.md"), "w") as f:
        f.write(table)
    with open(os.path.join(args.output_dir, "benchmark.json"), "w") as f:
        json.dump({"environment": env, "args": vars(args),
                   "results": [asdict(r) for r in results],
                   "photo_results": [asdict(r) for r in photos]}, f, indent=1)
    if results:
        plot(results, os.path.join(args.output_dir, "benchmark.png"))
    print(table)
    print(f"wrote {args.output_dir}/benchmark.{{md,json,png}}")
    return results + photos


if __name__ == "__main__":
    _args = parse_args()
    if _args.memory_probe:
        memory_probe(_args)
    else:
        main(_args)
