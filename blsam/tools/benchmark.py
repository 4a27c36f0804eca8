"""Side-by-side speed benchmark: official SAM encoder vs our fused one vs bLViT at several keep
ratios.

One command, one run: the headline is the ratio to the official encoder measured in the same
run (absolute times drift between machines and with load). Per model: GFLOPs in the paper's
convention (whole SAM, one prompt) and in the full one (encoder, attention included), latency
median and spread after warm-up, peak memory and images/s, for each device, dtype and batch
size asked for.

    blsam-benchmark --quick                       # ViT-B family, fp32, batch 1
    blsam-benchmark --families b h --dtypes fp32 bf16 --batch-sizes 1 8
    blsam-benchmark --quick --onnx --e2e          # + ONNX Runtime and SAM end to end

Fair by default: every model runs in a persistent worker process of its own (``--isolation
process``), all started with the same allocator setting, once with glibc's default allocator
and once tuned (``--malloc``; no page faults per forward), so no model inherits another's
fragmented heap. This process drives the workers round-robin, one forward per model per round,
so a drifting machine slows them alike. Minor page faults per forward are recorded, and the
CPU's ISA (AVX2 / AVX-512 / AMX, native bf16 or not) goes into the environment record.

Weights are random: latency does not depend on them (k tokens per window are routed whatever
the scores are), and no checkpoint download is needed.
"""
from __future__ import annotations

import argparse
import ctypes
import functools
import gc
import json
import os
import platform
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import torch

from blsam import blsam_model_registry
from blsam.build_blsam import build_vanilla_sam
from blsam.flops import count_flops
from blsam.specs import FAMILIES, MODEL_SPECS, PRUNING_MODELS, check_img_size, check_keep_ratio
from blsam.utils.cli import check_device, check_option, one_line_parse_errors, run_cli
from blsam.utils.jobs import LocalJob, RemoteJob, WorkerError, serve

# FAMILIES: benchmark family -> (vanilla SAM, bLViT student)
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ModelSpec:
    """One benchmarked encoder: ``kind`` is official, fused, blsam or pruning (a token-pruning
    baseline: ``registry`` names it, e.g. evit_b)."""

    name: str
    family: str
    kind: str
    keep_ratio: Optional[float] = None
    backend: str = "eager"  # or "onnxruntime"
    registry: Optional[str] = None

    def build(self, img_size: int) -> torch.nn.Module:
        vanilla, student = FAMILIES[self.family]
        if self.kind == "timm":
            return TimmSam(TIMM_SAM[self.family], img_size)
        if self.kind == "official":
            return build_vanilla_sam(vanilla, img_size=img_size)
        if self.kind == "fused":
            return build_vanilla_sam(vanilla, img_size=img_size, fused=True)
        if self.kind == "pruning":
            return blsam_model_registry[self.registry](img_size=img_size,
                                                       keep_ratio=self.keep_ratio)
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
    backend: str = "eager"
    malloc: str = "default"  # glibc allocator: "default" or "tuned" (no page faults)
    minor_faults_per_forward: float = float("nan")  # median over the timed runs
    bf16: Optional[str] = None  # bf16 rows: "native" (AMX / AVX512-BF16) or "emulated"
    ratio_latency_vs_timm: float = float("nan")
    ratio_latency_vs_eager: float = float("nan")  # ONNX Runtime rows: / the same model eager
    ratio_latency_vs_onnx_official: float = float("nan")  # ONNX rows: / official in ORT
    ratio_latency_vs_onnx_fused: float = float("nan")  # ONNX rows: / fused vanilla in ORT
    worker_pid: Optional[int] = None  # the process that ran it (--isolation process)
    worker_tuned: Optional[bool] = None  # whether that process ran with GLIBC_TUNABLES tuned


TIMM_SAM = {"b": "samvit_base_patch16", "h": "samvit_huge_patch16"}


class TimmSam(torch.nn.Module):
    """timm's SAM ViT (random weights) with an ``image_encoder`` that returns the neck
    features, like SAM's: the same 486 GMAC as the official ViT-B, another implementation."""

    def __init__(self, name: str, img_size: int) -> None:
        super().__init__()
        import timm

        model = timm.create_model(name, pretrained=False, img_size=img_size, num_classes=0)

        class Enc(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model, self.img_size = model, img_size

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.model.forward_features(x)

        self.image_encoder = Enc()


def timm_available() -> bool:
    try:
        import timm  # noqa: F401
    except ImportError:
        return False
    return True


def model_specs(families: Sequence[str], keep_ratios: Sequence[float],
                baselines: bool = False) -> List[ModelSpec]:
    """Per family: official, fused, the bLViT student at every keep ratio and, with
    ``baselines``, the family's token-pruning baselines (EViT, Evo-ViT) at their default
    keep ratio (0.5, the paper's Table 2)."""
    specs = []
    for fam in families:
        vanilla, student = FAMILIES[fam]
        specs.append(ModelSpec(vanilla, fam, "official"))
        specs.append(ModelSpec(f"{vanilla}_sdpa", fam, "fused"))
        for r in keep_ratios:
            specs.append(ModelSpec(f"{student}@{r:g}", fam, "blsam", r))
        for name in (PRUNING_MODELS if baselines else ()):
            spec = MODEL_SPECS[name]
            if spec.family == fam:
                r = spec.default_keep_ratio
                specs.append(ModelSpec(f"{name}@{r:g}", fam, "pruning", r, registry=name))
    return specs


def extra_specs(args: argparse.Namespace) -> List[ModelSpec]:
    """timm's SAM ViT (when timm is installed) and the ONNX Runtime rows (``--onnx``)."""
    specs = []
    for fam in args.families:
        if args.timm == "auto" and fam in TIMM_SAM and timm_available():
            specs.append(ModelSpec(f"timm_{TIMM_SAM[fam]}", fam, "timm"))
    if args.onnx:
        for fam in args.families:
            vanilla, student = FAMILIES[fam]
            specs.append(ModelSpec(f"{vanilla}[ort]", fam, "official", backend="onnxruntime"))
            # the same dense weights through this project's export path (fused attention where
            # ORT has it): separates the gain of routing from the gain of the exported kernels
            specs.append(ModelSpec(f"{vanilla}_sdpa[ort]", fam, "fused", backend="onnxruntime"))
            for r in args.keep_ratios:
                specs.append(ModelSpec(f"{student}@{r:g}[ort]", fam, "blsam", r, "onnxruntime"))
    return specs


def cpu_isa() -> Dict[str, object]:
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


def forward_fn(encoder: torch.nn.Module, x: torch.Tensor, dtype: Optional[torch.dtype]
               ) -> Callable[[], None]:
    """One timed forward: inference mode, autocast to ``dtype`` (None: as the weights are),
    and on CUDA a synchronize so the time covers the kernels."""
    dev = x.device

    def run() -> None:
        with torch.inference_mode(), torch.autocast(
            dev.type, dtype=dtype or torch.float32, enabled=dtype is not None
        ):
            encoder(x)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    return run


def _child(argv: List[str]) -> List[str]:
    """This benchmark in a fresh Python process (``-m``: works installed or from a checkout)."""
    return [sys.executable, "-m", "blsam.tools.benchmark", *argv]


def _child_env() -> Dict[str, str]:
    """The parent's environment, with this checkout first on the path (``-m`` looks there)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def cpu_peak_memory(spec: ModelSpec, args: argparse.Namespace, dtype: str, batch: int) -> float:
    """Peak resident-memory growth (MiB) of one CPU forward, measured in a fresh process.

    In this process the allocator keeps memory freed by earlier models and runs, so the RSS
    growth here would say more about the run order than about the model.
    """
    import subprocess

    cmd = _child(["--memory-probe", spec.name, "--img-size", str(args.img_size), "--threads",
                  str(args.threads), "--dtypes", dtype, "--batch-sizes", str(batch)])
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=_child_env())
    if out.returncode != 0:
        raise RuntimeError(f"memory probe failed: {out.stderr.strip().splitlines()[-1:]}")
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"])


def memory_probe(args: argparse.Namespace) -> None:
    """Child side of ``cpu_peak_memory``: build one encoder, run one forward, print the peak."""
    torch.set_num_threads(args.threads)
    name = args.memory_probe
    keep = [float(name.split("@")[1])] if "@" in name else []
    specs = {s.name: s for s in model_specs(sorted(FAMILIES), keep, baselines=True)}
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
    total_s = sum(c * best_mm_seconds(a, w, repeats) for a, w, c in replay.ops)
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


def sam_variants(args: argparse.Namespace) -> List[Dict[str, object]]:
    """The whole-SAM rows of the photo and end-to-end sections, as jobs: the first family's
    official SAM, then its bLViT at every keep ratio without and with ``skip_padding``."""
    vanilla, student = FAMILIES[args.families[0]]
    variants = [{"kind": "sam", "name": vanilla, "model": "official", "keep_ratio": None,
                 "skip_padding": False}]
    for r in args.keep_ratios:
        for skip in (False, True):
            variants.append({"kind": "sam", "name": f"{student}@{r:g}" + (
                "+skip_padding" if skip else ""), "model": "blsam", "keep_ratio": r,
                "skip_padding": skip})
    return variants


class SamJob:
    """One whole SAM behind segment_anything's own ``SamPredictor`` and
    ``SamAutomaticMaskGenerator`` (seed 0): ``set_image``, ``click`` (set_image + predict) and
    ``amg`` on a photo given by its aspect ratio. The encoder's time inside AMG is measured
    with forward hooks."""

    def __init__(self, job: Mapping[str, object], args: argparse.Namespace) -> None:
        from segment_anything import SamAutomaticMaskGenerator, SamPredictor

        vanilla, student = FAMILIES[args.families[0]]
        torch.manual_seed(0)
        if job["model"] == "official":
            sam = build_vanilla_sam(vanilla, img_size=args.img_size).eval()
        else:
            sam = blsam_model_registry[student](img_size=args.img_size,
                                                keep_ratio=job["keep_ratio"],
                                                skip_padding=job["skip_padding"]).eval()
        self.sam, self.blsam, self.args = sam, job["model"] == "blsam", args
        self.clock = {"t0": 0.0, "ms": 0.0}
        sam.image_encoder.register_forward_pre_hook(self._pre)
        sam.image_encoder.register_forward_hook(self._post)
        self.predictor = SamPredictor(sam)
        self.amg = SamAutomaticMaskGenerator(sam, points_per_side=args.e2e_points_per_side)
        self.photos: Dict[str, object] = {}
        self.hello = {"gflops_full_encoder": count_flops(sam, "full", part="image_encoder").total,
                      "tuned": tunables_active()}

    def _pre(self, *_) -> None:
        self.clock["t0"] = time.perf_counter()

    def _post(self, *_) -> None:
        self.clock["ms"] += (time.perf_counter() - self.clock["t0"]) * 1e3

    def _photo(self, aspect: str):
        if aspect not in self.photos:
            self.photos[aspect] = photo(aspect)
        return self.photos[aspect]

    def call(self, cmd: str, arg: str) -> Dict[str, object]:
        import numpy as np

        img = self._photo(arg)
        h, w = img.shape[:2]
        label = f"{arg} {PHOTOS[arg]} {w}x{h}"
        with torch.inference_mode():
            t0 = time.perf_counter()
            if cmd == "amg":
                self.clock["ms"] = 0.0
                masks = self.amg.generate(img)
                return {"amg_ms": (time.perf_counter() - t0) * 1e3,
                        "amg_encoder_ms": self.clock["ms"], "masks": len(masks)}
            self.predictor.set_image(img)
            t1 = time.perf_counter()
            if cmd == "click":
                self.predictor.predict(point_coords=np.array([[w // 2, h // 2]]),
                                       point_labels=np.array([1]), multimask_output=True)
                return {"set_image_ms": (t1 - t0) * 1e3, "photo": label,
                        "predict_ms": (time.perf_counter() - t1) * 1e3}
        if cmd != "set_image":
            raise ValueError(f"unknown command {cmd!r}")
        out: Dict[str, object] = {"ms": (t1 - t0) * 1e3, "photo": label,
                                  "gflops_full_encoder": self.hello["gflops_full_encoder"]}
        if self.blsam:  # padding-aware routing's cost depends on the photo
            x = torch.as_tensor(self.predictor.transform.apply_image(img)).permute(2, 0, 1)
            x = self.sam.preprocess(x[None].float())
            out["gflops_full_encoder"] = count_flops(self.sam, "full", part="image_encoder",
                                                     images=x).total
            ph, pw = self.predictor.input_size
            g = self.args.img_size // 16
            content = torch.zeros(g, g, dtype=torch.bool)
            content[: -(-ph // 16), : -(-pw // 16)] = True
            masks = [s["mask"][0] for s in self.sam.image_encoder.last_routing]
            out["padding_queries"] = float(sum(int((m & ~content).sum()) for m in masks))
            out["routed_queries"] = float(sum(int(m.sum()) for m in masks))
        return out


def _started(args: argparse.Namespace, jobs: List[Dict[str, object]], malloc: str) -> list:
    """Start every job (in its own process unless ``--isolation shared``), build them one by
    one, and drop those that failed with a warning."""
    handles = [start_job(args, j, malloc) for j in jobs]
    live = []
    for h in handles:
        if "error" in h.hello:
            print(f"warning: {h.job['name']}: {h.hello['error']}", file=sys.stderr)
            h.close()
        else:
            live.append(h)
    return live


def _call(h, handles: list, cmd: str, arg: str) -> Optional[Dict[str, object]]:
    """``h.call``; a worker that fails (e.g. killed for memory) is dropped from ``handles``
    with a warning, so the other models' rows still come out."""
    try:
        return h.call(cmd, arg)
    except WorkerError as e:
        print(f"warning: {h.job['name']}: {e}; its rows are left out", file=sys.stderr)
        handles.remove(h)
        h.close()
        return None


def _warm_up(handles: list, cmd: str, arg: str, n: int) -> None:
    """``n`` untimed calls of ``cmd`` on every worker (failing ones dropped, as ``_call``)."""
    for h in list(handles):
        for _ in range(n):
            if h in handles:
                _call(h, handles, cmd, arg)


def photo_rows(args: argparse.Namespace, malloc: str) -> List[Result]:
    """``SamPredictor.set_image`` on real photos of several aspect ratios: official SAM vs
    bLViT with the paper's routing and with ``skip_padding``, rounds interleaved; counts
    P-block queries on padding."""
    handles = _started(args, sam_variants(args), malloc)
    rows: List[Result] = []
    try:
        for aspect in args.photos:
            _warm_up(handles, "set_image", aspect, args.warmup)
            times: Dict[str, List[float]] = {h.job["name"]: [] for h in handles}
            last: Dict[str, Dict[str, object]] = {}
            for _ in range(args.repeats):
                for h in list(handles):
                    out = _call(h, handles, "set_image", aspect)
                    if out:
                        last[h.job["name"]] = out
                        times[h.job["name"]].append(out["ms"])
            for h in handles:
                job, out, t = h.job, last[h.job["name"]], times[h.job["name"]]
                res = Result(job["name"], args.families[0], job["model"], job["keep_ratio"],
                             "cpu", "fp32", 1, float("nan"), out["gflops_full_encoder"],
                             skip_padding=job["skip_padding"], photo=out["photo"], malloc=malloc)
                res.times_ms = [round(v, 3) for v in t]
                res.latency_ms_median = statistics.median(t)
                res.latency_ms_min, res.latency_ms_max = min(t), max(t)
                res.images_per_s = 1e3 / res.latency_ms_median
                res.gmacs_per_s = res.gflops_full_encoder / (res.latency_ms_median / 1e3)
                res.padding_queries = out.get("padding_queries", float("nan"))
                res.routed_queries = out.get("routed_queries", float("nan"))
                rows.append(res)
    finally:
        for h in handles:
            h.close()
    off = {r.photo: r for r in rows if r.kind == "official"}
    for r in rows:
        if r.photo in off:
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


def e2e_rows(args: argparse.Namespace, malloc: str) -> List[Dict[str, object]]:
    """What a SAM user waits for, on real photos: ``SamPredictor.set_image`` + ``predict``
    (one click, 3 masks) and ``SamAutomaticMaskGenerator.generate`` with its defaults, for the
    official encoder and bLViT at every keep ratio with and without ``skip_padding``. Each
    model in its own worker (``--isolation``); rounds interleaved across models."""
    handles = _started(args, sam_variants(args), malloc)
    rows: List[Dict[str, object]] = []
    try:
        for aspect in args.e2e_photos:
            rec = {h.job["name"]: {"set_image": [], "predict": [], "amg": [], "amg_encoder": [],
                                   "masks": []} for h in handles}
            photo_name = ""
            _warm_up(handles, "click", aspect, max(args.warmup, 1))
            for _ in range(args.repeats):
                for h in list(handles):
                    out = _call(h, handles, "click", aspect)
                    if out:
                        photo_name = out["photo"]
                        rec[h.job["name"]]["set_image"].append(out["set_image_ms"])
                        rec[h.job["name"]]["predict"].append(out["predict_ms"])
            for _ in range(args.e2e_amg_repeats):
                for h in list(handles):
                    out = _call(h, handles, "amg", aspect)
                    if out:
                        for k in ("amg", "amg_encoder"):
                            rec[h.job["name"]][k].append(out[f"{k}_ms"])
                        rec[h.job["name"]]["masks"].append(out["masks"])
            base = None
            for h in handles:
                t = rec[h.job["name"]]
                row = {"model": h.job["name"], "kind": h.job["model"],
                       "keep_ratio": h.job["keep_ratio"], "skip_padding": h.job["skip_padding"],
                       "photo": photo_name, "malloc": malloc, "isolation": args.isolation,
                       "set_image_ms": statistics.median(t["set_image"]),
                       "predict_ms": statistics.median(t["predict"]),
                       "amg_ms": statistics.median(t["amg"]),
                       "amg_encoder_ms": statistics.median(t["amg_encoder"]),
                       "amg_masks": t["masks"][-1], "times_ms": t,
                       "points_per_side": args.e2e_points_per_side}
                row["amg_encoder_share"] = row["amg_encoder_ms"] / row["amg_ms"]
                row["click_ms"] = row["set_image_ms"] + row["predict_ms"]
                if h.job["model"] == "official":
                    base = row
                if base is not None:
                    row["click_vs_official"] = row["click_ms"] / base["click_ms"]
                    row["amg_vs_official"] = row["amg_ms"] / base["amg_ms"]
                rows.append(row)
    finally:
        for h in handles:
            h.close()
    return rows


def e2e_table(rows: List[Dict[str, object]]) -> str:
    nan = float("nan")
    lines = [
        "End to end (segment_anything's own `SamPredictor` and `SamAutomaticMaskGenerator` "
        f"with {rows[0]['points_per_side']}² points, its other settings default; random "
        "weights, so the number of masks kept differs from a trained model's), glibc "
        f"allocator {rows[0]['malloc']}",
        "",
        "| model | photo | skip_padding | set_image ms | predict ms (1 click) "
        "| click total / official | AMG s | AMG / official | encoder in AMG s "
        "| encoder share of AMG | masks kept |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['photo']} | {r['skip_padding']} | {r['set_image_ms']:.0f} "
            f"| {r['predict_ms']:.0f} | {fmt(r.get('click_vs_official', nan))} "
            f"| {r['amg_ms'] / 1e3:.1f} "
            f"| {fmt(r.get('amg_vs_official', nan))} | {r['amg_encoder_ms'] / 1e3:.1f} "
            f"| {r['amg_encoder_share']:.2f} | {r['amg_masks']} |")
    return "\n".join(lines) + "\n"


def add_ratios(results: List[Result]) -> None:
    """Ratios to the official, fused and timm vanilla encoders (eager) of the same
    family/device/dtype/batch and allocator; ONNX Runtime rows also to the same model eager
    and to the official encoder in ONNX Runtime."""
    ref: Dict[tuple, Result] = {}
    for r in results:
        if r.error is None:
            ref[(r.model, r.backend, r.malloc, r.device, r.dtype, r.batch_size)] = r
        if r.kind in ("official", "fused", "timm") and r.error is None:
            ref[(r.kind, r.backend, r.family, r.device, r.dtype, r.batch_size, r.malloc)] = r
    for r in results:
        if r.error is not None:
            continue
        key = (r.family, r.device, r.dtype, r.batch_size, r.malloc)
        off, fused = ref.get(("official", "eager") + key), ref.get(("fused", "eager") + key)
        tm = ref.get(("timm", "eager") + key)
        if tm is not None:
            r.ratio_latency_vs_timm = r.latency_ms_median / tm.latency_ms_median
        if r.backend == "onnxruntime":
            eager = ref.get((r.model.replace("[ort]", ""), "eager", r.malloc, r.device,
                             r.dtype, r.batch_size))
            if eager is not None:
                r.ratio_latency_vs_eager = r.latency_ms_median / eager.latency_ms_median
            ort_off = ref.get(("official", "onnxruntime") + key)
            if ort_off is not None:
                r.ratio_latency_vs_onnx_official = r.latency_ms_median / ort_off.latency_ms_median
            ort_fused = ref.get(("fused", "onnxruntime") + key)
            if ort_fused is not None:
                r.ratio_latency_vs_onnx_fused = r.latency_ms_median / ort_fused.latency_ms_median
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
        "glibc_malloc_tuned": malloc_tuned, "loadavg_start": _loadavg(),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
    }
    env.update(cpu_isa())
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    return env


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "unknown"


def headline(results: List[Result], env: Dict[str, object]) -> str:
    """The ratios that matter, per family: default allocator vs fault-free (tuned)."""
    lines = [f"CPU: {env['cpu']} ({env['threads']} threads), ISA {env['isa']} "
             f"({', '.join(env['isa_flags']) or 'none'}; native bf16: {env['native_bf16']}), "
             f"torch {env['torch']}, {env['img_size']}², {env['repeats']} interleaved rounds "
             f"after {env['warmup']} warm-up; load average "
             + ", ".join(f"{m}: {e.get('loadavg_start')}" for m, e in env["per_mode"].items())
             + f" at the start, {env['loadavg_end']} at the end", "",
             "| model | backend | dtype | batch | latency / official, default allocator "
             "| latency / official, fault-free | / fused (fault-free) | / timm (fault-free) "
             "| ORT / eager (fault-free) | ORT / ORT official (fault-free) "
             "| ORT / ORT fused (fault-free) | page faults per forward (default → tuned) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    by = {(r.model, r.backend, r.dtype, r.batch_size, r.device, r.malloc): r for r in results}
    seen = set()
    for r in results:
        k = (r.model, r.backend, r.dtype, r.batch_size, r.device)
        if k in seen:
            continue
        seen.add(k)
        d, t = by.get(k + ("default",)), by.get(k + ("tuned",))
        t = t or d
        if t is None or t.error:
            continue
        faults = " → ".join(fmt(x.minor_faults_per_forward, 0) for x in (d, t) if x) \
            if d is not t else fmt(t.minor_faults_per_forward, 0)
        lines.append(
            f"| {r.model} | {r.backend} | {r.dtype} | {r.batch_size} "
            f"| {fmt(d.ratio_latency_vs_official) if d and d is not t else '–'} "
            f"| {fmt(t.ratio_latency_vs_official)} | {fmt(t.ratio_latency_vs_fused)} "
            f"| {fmt(t.ratio_latency_vs_timm)} | {fmt(t.ratio_latency_vs_eager)} "
            f"| {fmt(t.ratio_latency_vs_onnx_official)} "
            f"| {fmt(t.ratio_latency_vs_onnx_fused)} | {faults} |")
    return "\n".join(lines) + "\n"


def fmt(x: float, nd: int = 2) -> str:
    return "–" if x != x else f"{x:.{nd}f}"


def markdown_table(results: List[Result], env: Dict[str, object]) -> str:
    lines = [
        f"CPU: {env['cpu']} ({env['threads']} threads), torch {env['torch']}, "
        f"{env['img_size']}², warm-up {env['warmup']}, {env['repeats']} timed runs "
        f"(interleaved), glibc malloc tuned: {env['glibc_malloc_tuned']}, "
        f"load average at start {env.get('loadavg_start')}"
        + (f"; GPU: {env['gpu']}" if "gpu" in env else ""),
        "",
        "| model | backend | device | dtype | batch | GFLOPs paper (SAM) | GFLOPs full (encoder) "
        "| full FLOPs / official | latency ms (median) | min–max | img/s | peak MiB "
        "| latency / official | latency / fused | GMAC/s | of GEMM rate | of burst rate "
        "| page faults / forward |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        dtype = r.dtype + (f" ({r.bf16})" if r.bf16 else "")
        if r.error:
            lines.append(f"| {r.model} | {r.backend} | {r.device} | {dtype} | {r.batch_size} | "
                         f"{r.error} |" + " |" * 12)
            continue
        lines.append(
            f"| {r.model} | {r.backend} | {r.device} | {dtype} | {r.batch_size} "
            f"| {r.gflops_paper_sam:.1f} "
            f"| {r.gflops_full_encoder:.1f} | {fmt(r.ratio_gflops_full_vs_official)} "
            f"| {r.latency_ms_median:.1f} | {r.latency_ms_min:.0f}–{r.latency_ms_max:.0f} "
            f"| {r.images_per_s:.2f} | {fmt(r.peak_mem_mib, 0)} "
            f"| {fmt(r.ratio_latency_vs_official)} | {fmt(r.ratio_latency_vs_fused)} "
            f"| {fmt(r.gmacs_per_s, 1)} | {fmt(r.frac_of_gemm_rate)} "
            f"| {fmt(r.frac_of_burst_gemm_rate)} | {fmt(r.minor_faults_per_forward, 0)} |"
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
    if "bf16_matmul_gmacs_per_s" in env:
        lines += ["", f"bf16 rows: model cast with `.to(torch.bfloat16)`; **of GEMM rate** is "
                      f"over a bf16 (M, 768) x (768, 3072) matmul timed in the same run: "
                      f"{env['bf16_matmul_gmacs_per_s']:.1f} GMAC/s (fp32: "
                      f"{env['fp32_matmul_gmacs_per_s']:.1f})."]
    return "\n".join(lines) + "\n"


def plot(results: List[Result], path: str) -> None:
    """Latency and full GFLOPs versus keep ratio, with the vanilla encoders as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r.family, r.device, r.dtype, r.batch_size) for r in results if not r.error})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for g in groups:
        rs = [r for r in results
              if (r.family, r.device, r.dtype, r.batch_size) == g and not r.error]
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
    p.add_argument("--baselines", action="store_true",
                   help="also time each family's token-pruning baselines (EViT, Evo-ViT) at "
                        "keep 0.5, the paper's Table 2 setting")
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
    p.add_argument("--malloc", choices=["default", "tuned", "both"], default="both",
                   help="glibc allocator: default, tuned (mallopt: freed memory stays in the "
                        "process, no page faults per forward), or both (default), each in a "
                        "fresh process; the headline ratio is the fault-free one")
    p.add_argument("--tune-malloc", action="store_true", help="same as --malloc tuned")
    p.add_argument("--isolation", choices=["process", "shared"], default="process",
                   help="process: every model (and the GEMM probe) in a persistent worker "
                        "process of its own, started with the --malloc setting, driven "
                        "round-robin (no model inherits another's heap: fault-free with the "
                        "tuned allocator); shared: all in one process per setting (fast, for "
                        "tests; models fragment each other's heap)")
    p.add_argument("--onnx", action="store_true",
                   help="add ONNX Runtime rows (CPU, fp32, batch 1) for the official encoder, "
                        "the fused one and every keep ratio, exported as blsam-export-onnx "
                        "does")
    p.add_argument("--timm", choices=["auto", "skip"], default="auto",
                   help="auto: timm's SAM ViT as a row when timm is installed")
    p.add_argument("--allow-emulated-bf16", action="store_true",
                   help="time CPU bf16 rows even without native bf16 (very slow)")
    p.add_argument("--e2e", action="store_true",
                   help="end to end on real photos: SamPredictor.set_image + predict and "
                        "SamAutomaticMaskGenerator.generate (defaults), official vs bLViT "
                        "with and without skip_padding; share of AMG time in the encoder")
    p.add_argument("--e2e-photos", nargs="+", default=["4:3"], choices=sorted(PHOTOS))
    p.add_argument("--e2e-amg-repeats", type=int, default=1)
    p.add_argument("--e2e-points-per-side", type=int, default=32,
                   help="AMG grid (SAM's default 32); smaller only for tests")
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-extras", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true",
                   help="ViT-B family, keep 0.25 and 1.0, fp32, batch 1, 1 warm-up, 3 runs")
    p.add_argument("--cpu-memory", choices=["probe", "skip"], default="probe",
                   help="probe: CPU peak memory of each model in a fresh process (one forward)")
    p.add_argument("--gemm-rate", choices=["measure", "burst", "skip"], default="measure",
                   help="measure this machine's dense fp32 GEMM rate on b_t's matmul shapes: "
                        "burst (each shape alone, once) and sustained (all of them replayed "
                        "around every timed CPU fp32 forward; slower)")
    p.add_argument("--photos", nargs="*", default=[], choices=sorted(PHOTOS),
                   help="also time SamPredictor.set_image on real photos of these aspect "
                        "ratios: official ViT-B vs b_t with and without skip_padding")
    p.add_argument("--skip-models", action="store_true",
                   help="only the --photos rows (and the GEMM rate)")
    p.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    p.add_argument("--serve", default=None, help=argparse.SUPPRESS)  # a worker process's job
    p.add_argument("--output-dir", default="outputs/benchmark")
    args = one_line_parse_errors(p).parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.memory_probe:
        return args
    if args.tune_malloc:
        args.malloc = "tuned"
    if args.quick:
        args.families, args.keep_ratios, args.dtypes = ["b"], [0.25, 1.0], ["fp32"]
        args.batch_sizes, args.cpu_batch_sizes, args.cpu_dtypes = [1], [1], ["fp32"]
        args.warmup, args.repeats = 1, 3
    for r in args.keep_ratios:
        check_option(check_keep_ratio, r, "--keep-ratios")
    check_option(check_img_size, args.img_size, "--img-size")
    for name in ("batch_sizes", "cpu_batch_sizes"):
        if any(b < 1 for b in getattr(args, name) or []):
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("threads", "e2e_amg_repeats", "e2e_points_per_side"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.onnx and args.families and any(f not in FAMILIES for f in args.families):
        p.error("--onnx: unknown family")
    if args.warmup < 0 or args.repeats < 1:
        p.error("--warmup must be >= 0 and --repeats >= 1")
    return args


def default_devices() -> List[str]:
    """The rows to run without ``--devices``: the GPU alone where there is one, else the CPU."""
    return ["cuda"] if torch.cuda.is_available() else ["cpu"]


def malloc_modes(args: argparse.Namespace) -> List[str]:
    return ["default", "tuned"] if args.malloc == "both" else [args.malloc]


def onnx_path(spec: ModelSpec, args: argparse.Namespace) -> str:
    return os.path.join(args.output_dir, "onnx", f"{spec.name.replace('[ort]', '')}"
                        f"_{args.img_size}.onnx")


def export_onnx_rows(args: argparse.Namespace) -> None:
    """Export every ONNX row's encoder as blsam-export-onnx does (random weights, seed 0), at
    the start of every run: a file left by an earlier run may come from older export code."""
    from blsam.tools.export_onnx import DEFAULT_OPSET, export_encoder

    for spec in extra_specs(args):
        if spec.backend == "onnxruntime":
            torch.manual_seed(0)
            export_encoder(spec.build(args.img_size).eval(), onnx_path(spec, args),
                           DEFAULT_OPSET)


class _Entry:
    """One timed configuration: a model on a device, dtype and batch size."""

    def __init__(self, spec: ModelSpec, dev: str, dt: str, bs: int, res: Result) -> None:
        self.spec, self.dev, self.dt, self.bs, self.res = spec, dev, dt, bs, res
        self.job = None  # RemoteJob or LocalJob once started
        self.times: List[float] = []
        self.faults: List[int] = []
        self.gaps: List[float] = []  # GEMM replay seconds before the first run and after each
        self.peak = 0.0


def _minflt() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


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


def _make_runner(spec: ModelSpec, dev_name: str, dt: str, bs: int, encoder: torch.nn.Module,
                 args: argparse.Namespace) -> Callable[[], None]:
    dev = torch.device(dev_name)
    if spec.backend == "onnxruntime":
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = args.threads, 1
        sess = ort.InferenceSession(onnx_path(spec, args), so,
                                    providers=["CPUExecutionProvider"])
        feed = {sess.get_inputs()[0].name: torch.randn(
            1, 3, args.img_size, args.img_size).numpy()}
        return lambda: sess.run(None, feed)
    x = torch.randn(bs, 3, args.img_size, args.img_size, device=dev)
    if dt == "bf16" and dev.type == "cpu":
        # a bf16 model (``.to(torch.bfloat16)``), as a deployer casts it: autocast would keep
        # fp32 weights and re-cast them at every op
        import copy

        encoder = copy.deepcopy(encoder).to(torch.bfloat16)
        x = x.to(torch.bfloat16)
        dtype = None
    else:
        dtype = DTYPES[dt]
    return forward_fn(encoder, x, dtype)


class EncoderJob:
    """One timed configuration, built and warmed up: ``run`` times one forward and counts this
    process's minor page faults during it (and the CUDA peak above the weights)."""

    def __init__(self, job: Mapping[str, object], args: argparse.Namespace) -> None:
        spec = ModelSpec(**job["spec"])
        self.dev = torch.device(job["device"])
        torch.manual_seed(0)
        sam = spec.build(args.img_size).eval()
        ref = ModelSpec("", spec.family, "official").build(args.img_size) \
            if spec.kind == "timm" else sam
        flops = (count_flops(ref, "paper").total,
                 count_flops(ref, "full", part="image_encoder").total)
        encoder = sam.image_encoder.to(self.dev)
        del sam, ref
        self._run = _make_runner(spec, job["device"], job["dtype"], job["batch_size"], encoder,
                                 args)
        for _ in range(args.warmup):
            self._run()
        gc.collect()
        self.hello = {"flops": flops, "tuned": tunables_active()}

    def call(self, cmd: str, arg: str) -> Dict[str, object]:
        if cmd != "run":
            raise ValueError(f"unknown command {cmd!r}")
        cuda = self.dev.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.dev)
            base = torch.cuda.memory_allocated(self.dev)
        f0 = _minflt()
        t0 = time.perf_counter()
        self._run()
        out = {"ms": (time.perf_counter() - t0) * 1e3, "faults": _minflt() - f0}
        if cuda:
            out["peak_mib"] = (torch.cuda.max_memory_allocated(self.dev) - base) / 2**20
        return out


class GemmJob:
    """This machine's matmul rates, measured under the models' allocator setting: one
    (M, 768) x (768, 3072) matmul in fp32 (and bf16 when asked); with ``replay``, the burst
    rate of the student's GEMM shapes, and ``run`` replays them all (the sustained rate)."""

    def __init__(self, job: Mapping[str, object], args: argparse.Namespace) -> None:
        m = (args.img_size // 16) ** 2
        self.hello: Dict[str, object] = {
            "fp32_matmul_gmacs_per_s": matmul_rate(torch.float32, m), "tuned": tunables_active()}
        if job.get("bf16"):
            self.hello["bf16_matmul_gmacs_per_s"] = matmul_rate(torch.bfloat16, m)
        self.replay: Optional[GemmReplay] = None
        if job.get("replay"):
            self.replay = GemmReplay(args.img_size, str(job["student"]))
            self.hello.update(measure_gemm_rate(self.replay))

    def call(self, cmd: str, arg: str) -> Dict[str, object]:
        if cmd != "run" or self.replay is None:
            raise ValueError(f"unknown command {cmd!r}")
        return {"s": self.replay()}


JOBS = {"encoder": EncoderJob, "gemm": GemmJob, "sam": SamJob}


def make_job(args: argparse.Namespace, job: Mapping[str, object]):
    return JOBS[str(job["kind"])](job, args)


def start_job(args: argparse.Namespace, job: Dict[str, object], malloc: str):
    """``job`` in a persistent worker process of its own, started with ``malloc``'s allocator
    settings (``--isolation process``), or in this process (``shared``)."""
    if args.isolation == "shared":
        return LocalJob(functools.partial(make_job, args), job)
    env = _child_env()
    env.pop("GLIBC_TUNABLES", None)
    if malloc == "tuned":
        env["GLIBC_TUNABLES"] = GLIBC_TUNABLES
    return RemoteJob("blsam.tools.benchmark", job, args.argv, env)


def _plan(args: argparse.Namespace, malloc: str, env: Dict[str, object]) -> List[_Entry]:
    """Every configuration to time; rows that will not run say why in ``error``."""
    devices = args.devices or default_devices()
    specs = [] if args.skip_models else model_specs(args.families, args.keep_ratios,
                                                    args.baselines)
    specs += [] if args.skip_models else extra_specs(args)
    native = bool(env.get("native_bf16"))
    entries: List[_Entry] = []
    for spec in specs:
        for dev in devices:
            if spec.backend == "onnxruntime" and dev != "cpu":
                continue
            dtypes = args.cpu_dtypes if dev == "cpu" and args.cpu_dtypes else args.dtypes
            sizes = (args.cpu_batch_sizes if dev == "cpu" and args.cpu_batch_sizes
                     else args.batch_sizes)
            if spec.backend == "onnxruntime":  # exported graphs: fp32, batch 1
                dtypes, sizes = [d for d in dtypes if d == "fp32"], [1]
            for dt in dtypes:
                for bs in sizes:
                    nan = float("nan")
                    res = Result(spec.name, spec.family, spec.kind, spec.keep_ratio, dev, dt,
                                 bs, nan, nan, backend=spec.backend, malloc=malloc)
                    entries.append(_Entry(spec, dev, dt, bs, res))
                    if dt == "bf16" and dev == "cpu":
                        res.bf16 = "native" if native else "emulated"
                        if not native and not args.allow_emulated_bf16:
                            res.error = ("skipped: bf16 is emulated on this CPU (no AMX / "
                                         "AVX512-BF16); --allow-emulated-bf16 runs it")
    return entries


def run_models(args: argparse.Namespace, malloc: str, env: Dict[str, object],
               replay=None) -> List[Result]:
    """Build every configuration (each in its own worker process unless ``--isolation
    shared``) and warm it up, then time them round-robin: round r runs every model once, so
    slow phases of a shared machine hit all models alike. ``replay``: the GEMM job whose
    sustained rate is measured around every CPU fp32 run."""
    from tqdm import tqdm

    entries = _plan(args, malloc, env)
    live = [e for e in entries if e.res.error is None]
    for e in live:  # started together (imports in parallel), built one by one below
        e.job = start_job(args, {"kind": "encoder", "name": e.spec.name, "spec": asdict(e.spec),
                                 "device": e.dev, "dtype": e.dt, "batch_size": e.bs}, malloc)
    bar = tqdm(total=len(live) * (args.repeats + 1), desc=f"benchmark ({malloc})", unit="run")
    for e in live:
        hello = e.job.hello
        bar.update()
        if "error" in hello:
            e.res.error = str(hello["error"])[:120]
            e.job.close()
            continue
        e.res.gflops_paper_sam, e.res.gflops_full_encoder = hello["flops"]
        if args.isolation == "process":
            e.res.worker_pid, e.res.worker_tuned = hello["pid"], hello["tuned"]
    live = [e for e in live if e.res.error is None]
    gc.collect()
    cpu_fp32 = [e for e in live if e.dev == "cpu" and e.dt == "fp32" and replay is not None]
    try:
        for _ in range(args.repeats):
            for e in live:
                if e.res.error:
                    continue
                if e in cpu_fp32 and not e.gaps:
                    e.gaps.append(replay.call("run")["s"])
                try:
                    out = e.job.call("run")
                except WorkerError as err:  # e.g. out of memory
                    e.res.error = str(err)[:120]
                    continue
                e.times.append(out["ms"])
                e.faults.append(out["faults"])
                e.peak = max(e.peak, out.get("peak_mib", 0.0))
                if e in cpu_fp32:
                    e.gaps.append(replay.call("run")["s"])
                bar.update()
    finally:
        for e in live:
            e.job.close()
        bar.close()
    results = []
    for e in entries:
        res = e.res
        results.append(res)
        if res.error or not e.times:
            continue
        t = e.times
        res.times_ms = [round(v, 3) for v in t]
        res.latency_ms_median = statistics.median(t)
        res.latency_ms_min, res.latency_ms_max = min(t), max(t)
        res.latency_ms_iqr = _quantile(t, 0.75) - _quantile(t, 0.25)
        res.images_per_s = e.bs / (res.latency_ms_median / 1e3)
        res.minor_faults_per_forward = float(statistics.median(e.faults))
        res.peak_mem_mib = e.peak if e.dev == "cuda" else float("nan")
        if e.gaps:  # each run against the sustained GEMM rate just before and after it
            gmacs = env["gemm_gmacs"]
            rates = [gmacs / ((a + b) / 2) for a, b in zip(e.gaps, e.gaps[1:])]
            res.gemm_gmacs_per_s_runs = [round(v, 2) for v in rates]
            res.frac_of_gemm_rate = statistics.median(
                res.gflops_full_encoder * e.bs / (ms / 1e3) / rate for ms, rate in zip(t, rates))
        if (e.dev == "cpu" and args.cpu_memory == "probe" and e.spec.backend == "eager"
                and e.spec.kind != "timm"):
            try:
                res.peak_mem_mib = cpu_peak_memory(e.spec, args, e.dt, e.bs)
            except RuntimeError as err:
                print(f"warning: {e.spec.name}: {err}", file=sys.stderr)
    return results


def worker(args: argparse.Namespace, malloc: str, extras: bool = True) -> Dict[str, object]:
    """Everything timed under one allocator setting (``extras``: the photo and end-to-end
    rows too). With ``--isolation process`` every model and the GEMM probe run in worker
    processes started with that setting; with ``shared`` all run in this process, which must
    then have been started with it."""
    torch.set_num_threads(args.threads)
    shared = args.isolation == "shared"
    tuned = tune_glibc_malloc() if malloc == "tuned" and shared else malloc == "tuned"
    devices = args.devices or default_devices()
    if "cuda" in devices and not torch.cuda.is_available():
        raise SystemExit("--devices cuda asked for, but CUDA is not available")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 on every device
    torch.backends.cudnn.allow_tf32 = False
    env = environment(args, tuned)
    if not shared:
        env["glibc_tunables"] = GLIBC_TUNABLES if tuned else None
    bf16 = "bf16" in (args.cpu_dtypes or args.dtypes) and "cpu" in devices and (
        env["native_bf16"] or args.allow_emulated_bf16)
    replay_on = args.gemm_rate != "skip" and "cpu" in devices
    gemm = None
    if replay_on or bf16:  # the machine's matmul rates, under the same allocator setting
        gemm = start_job(args, {"kind": "gemm", "name": "gemm", "bf16": bf16,
                                "replay": replay_on, "student": FAMILIES[args.families[0]][1]},
                         malloc)
    try:
        if gemm is not None:
            if "error" in gemm.hello:
                raise RuntimeError(f"GEMM probe failed: {gemm.hello['error']}")
            env.update({k: v for k, v in gemm.hello.items() if k not in ("pid", "tuned")})
        print(json.dumps(env))
        sustained = gemm if replay_on and args.gemm_rate == "measure" else None
        results = run_models(args, malloc, env, sustained)
    finally:
        if gemm is not None:
            gemm.close()
    if not shared:  # what the workers ran under (the environment they were started with)
        hellos = [r.worker_tuned for r in results if r.worker_tuned is not None]
        env["glibc_malloc_tuned"] = all(hellos) if hellos else tuned
    for r in results:
        if r.error is None:
            r.gmacs_per_s = r.gflops_full_encoder * r.batch_size / (r.latency_ms_median / 1e3)
            if r.device == "cpu" and r.dtype == "fp32" and "gemm_burst_gmacs_per_s" in env:
                r.frac_of_burst_gemm_rate = r.gmacs_per_s / env["gemm_burst_gmacs_per_s"]
            if r.device == "cpu" and r.dtype == "bf16" and "bf16_matmul_gmacs_per_s" in env:
                r.frac_of_gemm_rate = r.gmacs_per_s / env["bf16_matmul_gmacs_per_s"]
    out: Dict[str, object] = {"environment": env, "results": [asdict(r) for r in results]}
    if args.photos and extras:
        out["photo_results"] = [asdict(r) for r in photo_rows(args, malloc)]
    if args.e2e and extras:
        out["e2e_results"] = e2e_rows(args, malloc)
    return out


def _results(rows: List[dict]) -> List[Result]:
    return [Result(**r) for r in rows]


def main(args: argparse.Namespace) -> List[Result]:
    modes = malloc_modes(args)
    if args.onnx and not args.skip_models and not args.worker_out:
        export_onnx_rows(args)  # once, before the timed processes
    os.makedirs(args.output_dir, exist_ok=True)
    if args.worker_out:
        with open(args.worker_out, "w") as f:
            json.dump(worker(args, modes[0], args.worker_extras), f)
        return []
    outs = []
    if args.isolation == "process" or (
            len(modes) == 1 and (modes[0] == "default" or tunables_active())):
        outs = [worker(args, mode, mode == modes[-1]) for mode in modes]
    else:  # shared: a fresh process per allocator setting, with the same arguments otherwise
        import subprocess

        for mode in modes:
            path = os.path.join(args.output_dir, f".worker_{mode}.json")
            cmd = _child([*args.argv, "--malloc", mode, "--worker-out", path]
                         + (["--worker-extras"] if mode == modes[-1] else []))
            env = _child_env()
            env.pop("GLIBC_TUNABLES", None)
            if mode == "tuned":
                env["GLIBC_TUNABLES"] = GLIBC_TUNABLES
            subprocess.run(cmd, check=True, env=env)
            with open(path) as f:
                outs.append(json.load(f))
            os.remove(path)
    results = [r for o in outs for r in _results(o["results"])]
    photos = [r for o in outs for r in _results(o.get("photo_results", []))]
    e2e = [r for o in outs for r in o.get("e2e_results", [])]
    env = dict(outs[-1]["environment"])
    env["malloc_modes"] = modes
    env["isolation"] = args.isolation
    env["loadavg_end"] = _loadavg()
    env["per_mode"] = {m: o["environment"] for m, o in zip(modes, outs)}
    add_ratios(results)
    table = headline(results, env) if results else ""
    for mode in modes:
        rows = [r for r in results if r.malloc == mode]
        if rows:
            table += f"\n### glibc allocator: {mode}\n\n" + markdown_table(
                rows, env["per_mode"][mode])
    if photos:
        table += "\n" + photo_table(photos)
    if e2e:
        table += "\n" + e2e_table(e2e)
    with open(os.path.join(args.output_dir, "benchmark.md"), "w") as f:
        f.write(table)
    with open(os.path.join(args.output_dir, "benchmark.json"), "w") as f:
        json.dump({"environment": env, "args": vars(args),
                   "results": [asdict(r) for r in results],
                   "photo_results": [asdict(r) for r in photos],
                   "e2e_results": e2e}, f, indent=1)
    if results:
        plot([r for r in results if r.malloc == modes[-1] and r.backend == "eager"],
             os.path.join(args.output_dir, "benchmark.png"))
    print(table)
    print(f"wrote {args.output_dir}/benchmark.{{md,json,png}}")
    return results + photos


def cli(argv: Optional[List[str]] = None) -> int:
    """``blsam-benchmark``: a user error is one ``error:`` line and exit 2."""

    def body() -> None:
        args = parse_args(argv)
        for dev in args.devices or ():  # here, not in a worker process: one line, exit 2
            check_device(dev, "--devices")
        if args.serve:
            raise SystemExit(serve(json.loads(args.serve), functools.partial(make_job, args)))
        memory_probe(args) if args.memory_probe else main(args)

    return run_cli(body, extra="bench", argv=argv)


if __name__ == "__main__":
    sys.exit(cli())
