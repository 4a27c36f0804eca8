"""What runs inside a worker process: one encoder configuration (``EncoderJob``), the GEMM
probe, one whole SAM on photos, a one-forward memory probe and a whole sweep in a fresh process.
``start_job`` starts one (``blsam.bench.workers`` is the child's entry point)."""
from __future__ import annotations

import copy
import dataclasses
import functools
import gc
import time
from collections.abc import Callable, Mapping

import torch

from blsam import blsam_model_registry
from blsam.build_blsam import build_vanilla_sam
from blsam.flops import count_flops
from blsam.specs import FAMILIES
from blsam.utils.dist import synchronize
from blsam.utils.jobs import LocalJob, RemoteJob

from .config import DTYPES, BenchConfig
from .gemm import GemmReplay, matmul_rate, measure_gemm_rate
from .machine import GLIBC_TUNABLES, RssPeak, child_env, minflt, tunables_active
from .models import BenchModel, onnx_path


def forward_fn(encoder: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype | None
               ) -> Callable[[], None]:
    """One timed forward: inference mode, autocast to ``dtype`` (None: as the weights are),
    and on CUDA a synchronize so the time covers the kernels."""
    dev = x.device

    def run() -> None:
        with torch.inference_mode(), torch.autocast(
            dev.type, dtype=dtype or torch.float32, enabled=dtype is not None
        ):
            encoder(x)
        synchronize(dev)

    return run


def attention_path(device: str, dtype: str) -> str | None:
    """The attention kernel this device and dtype take (``blsam.modeling.attention``'s rule)."""
    from blsam.modeling.attention import attention_path as rule

    try:
        return rule(torch.device(device).type, DTYPES[dtype] or torch.float32)
    except Exception as e:  # noqa: BLE001 - a label, never a reason to lose the row
        return f"unknown ({type(e).__name__})"


def make_runner(spec: BenchModel, dev_name: str, dt: str, bs: int, encoder: torch.nn.Module,
                 cfg: BenchConfig) -> Callable[[], None]:
    dev = torch.device(dev_name)
    if spec.backend == "onnxruntime":
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = cfg.threads, 1
        sess = ort.InferenceSession(onnx_path(spec, cfg), so,
                                    providers=["CPUExecutionProvider"])
        feed = {sess.get_inputs()[0].name: torch.randn(
            1, 3, cfg.img_size, cfg.img_size).numpy()}
        return lambda: sess.run(None, feed)
    x = torch.randn(bs, 3, cfg.img_size, cfg.img_size, device=dev)
    if dt == "bf16" and dev.type == "cpu":
        # a bf16 model (``.to(torch.bfloat16)``), as a deployer casts it: autocast would keep
        # fp32 weights and re-cast them at every op (that is the "autocast" row)
        encoder = copy.deepcopy(encoder).to(torch.bfloat16)
        x = x.to(torch.bfloat16)
        dtype = None
    else:
        dtype = DTYPES[dt]
    return forward_fn(encoder, x, dtype)


class EncoderJob:
    """One timed configuration, built and warmed up: ``run`` times one forward and counts this
    process's minor page faults during it (and the CUDA peak above the weights)."""

    def __init__(self, job: Mapping[str, object], cfg: BenchConfig) -> None:
        spec = BenchModel(**job["spec"])
        self.dev = torch.device(job["device"])
        torch.manual_seed(0)
        t0 = time.perf_counter()
        sam = spec.build(cfg.img_size).eval()
        ref = BenchModel("", spec.family, "official").build(cfg.img_size) \
            if spec.kind == "timm" else sam
        flops = (count_flops(ref, "paper").total,
                 count_flops(ref, "full", part="image_encoder").total)
        t1 = time.perf_counter()
        encoder = sam.image_encoder.to(self.dev)
        del sam, ref
        self._run = make_runner(spec, job["device"], job["dtype"], job["batch_size"], encoder,
                                 cfg)
        t2 = time.perf_counter()
        for _ in range(cfg.warmup):
            self._run()
        gc.collect()
        # where a slow start goes: building + FLOP counting (two fp32 forwards whatever the
        # dtype) vs the warm-up forwards in the row's own dtype
        self.hello = {"flops": flops, "tuned": tunables_active(),
                      "build_s": round(t1 - t0, 2), "warmup_s": round(time.perf_counter() - t2, 2),
                      "attention_path": attention_path(job["device"], job["dtype"])}

    def call(self, cmd: str, arg: str) -> dict[str, object]:
        if cmd == "profile":  # after the timed runs: one forward under torch.profiler
            from .profile import profile_ops

            return {"op_profile": profile_ops(self._run)}
        if cmd != "run":
            raise ValueError(f"unknown command {cmd!r}")
        cuda = self.dev.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.dev)
            base = torch.cuda.memory_allocated(self.dev)
        f0 = minflt()
        t0 = time.perf_counter()
        self._run()
        out = {"ms": (time.perf_counter() - t0) * 1e3, "faults": minflt() - f0}
        if cuda:
            out["peak_mib"] = (torch.cuda.max_memory_allocated(self.dev) - base) / 2**20
        return out


class GemmJob:
    """This machine's matmul rates, measured under the models' allocator setting: one
    (M, 768) x (768, 3072) matmul in fp32 (and bf16 when asked); with ``replay``, the burst
    rate of the student's GEMM shapes, and ``run`` replays them all (the sustained rate)."""

    def __init__(self, job: Mapping[str, object], cfg: BenchConfig) -> None:
        m = (cfg.img_size // 16) ** 2
        self.hello: dict[str, object] = {
            "fp32_matmul_gmacs_per_s": matmul_rate(torch.float32, m), "tuned": tunables_active()}
        if job.get("bf16"):  # bf16 and autocast rows
            self.hello["bf16_matmul_gmacs_per_s"] = matmul_rate(torch.bfloat16, m)
        self.replay: GemmReplay | None = None
        if job.get("replay"):
            self.replay = GemmReplay(cfg.img_size, str(job["student"]))
            self.hello.update(measure_gemm_rate(self.replay))

    def call(self, cmd: str, arg: str) -> dict[str, object]:
        if cmd != "run" or self.replay is None:
            raise ValueError(f"unknown command {cmd!r}")
        return {"s": self.replay()}


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


class SamJob:
    """One whole SAM behind segment_anything's own ``SamPredictor`` and
    ``SamAutomaticMaskGenerator`` (seed 0): ``set_image``, ``click`` (set_image + predict) and
    ``amg`` on a photo given by its aspect ratio. The encoder's time inside AMG is measured
    with forward hooks."""

    def __init__(self, job: Mapping[str, object], cfg: BenchConfig) -> None:
        from segment_anything import SamAutomaticMaskGenerator, SamPredictor

        vanilla, student = FAMILIES[cfg.families[0]]
        torch.manual_seed(0)
        if job["model"] == "official":
            sam = build_vanilla_sam(vanilla, img_size=cfg.img_size).eval()
        else:
            sam = blsam_model_registry[student](img_size=cfg.img_size,
                                                keep_ratio=job["keep_ratio"],
                                                skip_padding=job["skip_padding"]).eval()
        self.dev = torch.device(str(job.get("device", "cpu")))
        sam = sam.to(self.dev)
        self.sam, self.blsam, self.cfg = sam, job["model"] == "blsam", cfg
        self.clock = {"t0": 0.0, "ms": 0.0}
        sam.image_encoder.register_forward_pre_hook(self._pre)
        sam.image_encoder.register_forward_hook(self._post)
        self.predictor = SamPredictor(sam)
        self.amg = SamAutomaticMaskGenerator(sam, points_per_side=cfg.e2e_points_per_side)
        self.photos: dict[str, object] = {}
        self.hello = {"gflops_full_encoder": count_flops(sam, "full", part="image_encoder").total,
                      "tuned": tunables_active()}

    def _pre(self, *_) -> None:
        synchronize(self.dev)
        self.clock["t0"] = time.perf_counter()

    def _post(self, *_) -> None:
        synchronize(self.dev)
        self.clock["ms"] += (time.perf_counter() - self.clock["t0"]) * 1e3

    def _photo(self, aspect: str):
        if aspect not in self.photos:
            self.photos[aspect] = photo(aspect)
        return self.photos[aspect]

    def call(self, cmd: str, arg: str) -> dict[str, object]:
        import numpy as np

        img = self._photo(arg)
        h, w = img.shape[:2]
        label = f"{arg} {PHOTOS[arg]} {w}x{h}"
        with torch.inference_mode():
            t0 = time.perf_counter()
            if cmd == "amg":
                self.clock["ms"] = 0.0
                masks = self.amg.generate(img)
                synchronize(self.dev)
                return {"amg_ms": (time.perf_counter() - t0) * 1e3,
                        "amg_encoder_ms": self.clock["ms"], "masks": len(masks)}
            self.predictor.set_image(img)
            synchronize(self.dev)
            t1 = time.perf_counter()
            if cmd == "click":
                self.predictor.predict(point_coords=np.array([[w // 2, h // 2]]),
                                       point_labels=np.array([1]), multimask_output=True)
                synchronize(self.dev)
                return {"set_image_ms": (t1 - t0) * 1e3, "photo": label,
                        "predict_ms": (time.perf_counter() - t1) * 1e3}
        if cmd != "set_image":
            raise ValueError(f"unknown command {cmd!r}")
        out: dict[str, object] = {"ms": (t1 - t0) * 1e3, "photo": label,
                                  "gflops_full_encoder": self.hello["gflops_full_encoder"]}
        if self.blsam:  # padding-aware routing's cost depends on the photo
            x = torch.as_tensor(self.predictor.transform.apply_image(img)).permute(2, 0, 1)
            x = self.sam.preprocess(x[None].float().to(self.dev))
            out["gflops_full_encoder"] = count_flops(self.sam, "full", part="image_encoder",
                                                     images=x).total
            ph, pw = self.predictor.input_size
            g = self.cfg.img_size // 16
            content = torch.zeros(g, g, dtype=torch.bool)
            content[: -(-ph // 16), : -(-pw // 16)] = True
            masks = [s["mask"][0] for s in self.sam.image_encoder.last_routing]
            out["padding_queries"] = float(sum(int((m & ~content).sum()) for m in masks))
            out["routed_queries"] = float(sum(int(m.sum()) for m in masks))
        return out


class MemoryJob:
    """Peak resident-memory growth of one CPU forward, measured when built (a fresh process:
    in a long-lived one the allocator keeps memory freed by earlier models)."""

    def __init__(self, job: Mapping[str, object], cfg: BenchConfig) -> None:
        torch.set_num_threads(cfg.threads)
        enc = BenchModel(**job["spec"]).build(cfg.img_size).eval().image_encoder
        x = torch.randn(int(job["batch_size"]), 3, cfg.img_size, cfg.img_size)
        dtype = DTYPES[str(job["dtype"])]
        gc.collect()
        with RssPeak() as mem, torch.inference_mode(), torch.autocast(
            "cpu", dtype=dtype or torch.float32, enabled=dtype is not None
        ):
            enc(x)
        self.hello = {"peak_mib": mem.peak / 2**20}

    def call(self, cmd: str, arg: str) -> dict[str, object]:
        raise ValueError(f"unknown command {cmd!r}")


class SweepJob:
    """A whole sweep under one allocator setting (``--isolation shared``): this process was
    started with that setting, and its rows are the reply."""

    def __init__(self, job: Mapping[str, object], cfg: BenchConfig) -> None:
        from .run import sweep

        self.hello = {"out": sweep(cfg, str(job["malloc"]), bool(job["extras"]))}

    def call(self, cmd: str, arg: str) -> dict[str, object]:
        raise ValueError(f"unknown command {cmd!r}")


JOBS = {"encoder": EncoderJob, "gemm": GemmJob, "sam": SamJob, "memory": MemoryJob,
        "sweep": SweepJob}
WORKER_MODULE = "blsam.bench.workers"


def make_job(cfg: BenchConfig, job: Mapping[str, object]):
    """The factory a worker calls with its job (``kind`` picks the class)."""
    return JOBS[str(job["kind"])](job, cfg)


def remote(cfg: BenchConfig, job: dict[str, object], malloc: str | None) -> RemoteJob:
    """``job`` in a fresh worker process; ``malloc``: start it with that allocator setting
    (None: this process's environment as it is)."""
    env = child_env()
    if malloc is not None:
        env.pop("GLIBC_TUNABLES", None)
        if malloc == "tuned":
            env["GLIBC_TUNABLES"] = GLIBC_TUNABLES
    return RemoteJob(WORKER_MODULE, job, [cfg.to_json()], env)


def start_job(cfg: BenchConfig, job: dict[str, object], malloc: str):
    """``job`` in a persistent worker process of its own, started with ``malloc``'s allocator
    settings (``--isolation process``), or in this process (``shared``)."""
    if cfg.isolation == "shared":
        return LocalJob(functools.partial(make_job, cfg), job)
    return remote(cfg, job, malloc)


def start_sweep(cfg: BenchConfig, malloc: str, extras: bool) -> RemoteJob:
    """A whole ``--isolation shared`` sweep in a fresh process started with ``malloc``."""
    return remote(cfg, {"kind": "sweep", "name": f"sweep_{malloc}", "malloc": malloc,
                        "extras": extras}, malloc)


def cpu_peak_memory(spec: BenchModel, cfg: BenchConfig, dtype: str, batch: int) -> float:
    """Peak resident-memory growth (MiB) of one CPU forward, measured in a fresh process.

    In this process the allocator keeps memory freed by earlier models and runs, so the RSS
    growth here would say more about the run order than about the model.
    """
    job = remote(cfg, {"kind": "memory", "name": f"memory {spec.name}",
                       "spec": dataclasses.asdict(spec), "dtype": dtype, "batch_size": batch},
                 None)
    try:
        hello = job.hello
    finally:
        job.close()
    if "error" in hello:
        raise RuntimeError(f"memory probe failed: {hello['error']}")
    return float(hello["peak_mib"])
