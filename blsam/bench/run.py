"""One benchmark run: the plan, the workers started under each allocator setting, the
interleaved timing, the files written (the photo and end-to-end rows: ``bench.photos``)."""
from __future__ import annotations

import gc
import json
import os
import statistics
import sys
from dataclasses import asdict

import torch

from blsam.specs import FAMILIES
from blsam.utils.files import write_json_atomic, write_text_atomic
from blsam.utils.jobs import WorkerError

from .config import BenchConfig, default_devices, malloc_modes
from .jobs import cpu_peak_memory, start_job
from .machine import GLIBC_TUNABLES, environment, loadavg, tunables_active, tune_glibc_malloc
from .models import BenchModel, export_onnx_rows, extra_specs, model_specs
from .photos import e2e_rows, photo_rows
from .report import e2e_table, headline, markdown_table, op_profile_table, photo_table, plot
from .residency import USABLE, gpu_waves, resident_bytes
from .results import Result, add_ratios, from_dicts, summarise
from .schedule import interleaved

BF16_ROWS = {"bf16", "autocast"}  # rows whose matmuls run in bf16 (weights cast, or autocast)


class _Entry:
    """One timed configuration: a model on a device, dtype and batch size."""

    def __init__(self, spec: BenchModel, dev: str, dt: str, bs: int, res: Result) -> None:
        self.spec, self.dev, self.dt, self.bs, self.res = spec, dev, dt, bs, res
        self.job = None  # RemoteJob or LocalJob once started
        self.times: list[float] = []
        self.faults: list[int] = []
        self.gaps: list[float] = []  # GEMM replay seconds before the first run and after each
        self.peak = 0.0


def _plan(cfg: BenchConfig, malloc: str, env: dict[str, object],
          cuda_rows: bool = True) -> list[_Entry]:
    """Every configuration to time; rows that will not run say why in ``error``. CUDA rows
    only with ``cuda_rows`` (the last allocator setting: glibc's cannot affect the GPU)."""
    devices = cfg.devices or default_devices()
    specs = [] if cfg.skip_models else model_specs(cfg.families, cfg.keep_ratios,
                                                    cfg.baselines, cfg.ablation)
    specs += [] if cfg.skip_models else extra_specs(cfg)
    if cfg.rows:
        specs = [s for s in specs if s.name in cfg.rows]
    native = bool(env.get("native_bf16"))
    entries: list[_Entry] = []
    for spec in specs:
        for dev in devices:
            if (spec.backend == "onnxruntime" or not cuda_rows) and dev != "cpu":
                continue
            dtypes = cfg.cpu_dtypes if dev == "cpu" and cfg.cpu_dtypes else cfg.dtypes
            sizes = (cfg.cpu_batch_sizes if dev == "cpu" and cfg.cpu_batch_sizes
                     else cfg.batch_sizes)
            if spec.backend == "onnxruntime":  # exported graphs: fp32, batch 1
                dtypes, sizes = [d for d in dtypes if d == "fp32"], [1]
            for dt in dtypes:
                for bs in sizes:
                    nan = float("nan")
                    res = Result(spec.name, spec.family, spec.kind, spec.keep_ratio, dev, dt,
                                 bs, nan, nan, backend=spec.backend, malloc=malloc)
                    entries.append(_Entry(spec, dev, dt, bs, res))
                    if dt in BF16_ROWS and dev == "cpu":
                        res.bf16 = "native" if native else "emulated"
                        if not native and not cfg.allow_emulated_bf16:
                            res.error = ("skipped: bf16 is emulated on this CPU (no AMX / "
                                         "AVX512-BF16); --allow-emulated-bf16 runs it")
    return entries


def waves(cfg: BenchConfig, live: list[_Entry]) -> list[list[_Entry]]:
    """The CPU rows in one wave; the CUDA rows in as many as fit on the device at once
    (``blsam.bench.residency``); a group that cannot fit even alone gets its ``error``."""
    cpu = [e for e in live if e.dev == "cpu"]
    cuda = [e for e in live if e.dev != "cpu"]
    if not cuda:
        return [cpu] if cpu else []
    capacity = torch.cuda.get_device_properties(0).total_memory
    packed, too_big = gpu_waves(
        cuda, lambda e: resident_bytes(e.spec, cfg.img_size, e.dt, e.bs),
        lambda e: (e.spec.family, e.dev, e.dt, e.bs), capacity)
    for e, need in too_big:
        e.res.error = (f"skipped: needs ~{need / 2**30:.1f} GiB on {e.dev} ({e.dt}, batch "
                       f"{e.bs}), more than {USABLE:.0%} of {capacity / 2**30:.1f} GiB")
    out = ([cpu] if cpu else []) + packed
    for i, wave in enumerate(out):
        for e in wave:
            e.res.wave = i  # rows of one wave were interleaved with each other
    return out


def run_models(cfg: BenchConfig, malloc: str, env: dict[str, object],
               replay=None, cuda_rows: bool = True) -> list[Result]:
    """Build every configuration (each in its own worker process unless ``--isolation
    shared``) and warm it up, then time them round-robin: round r runs every model once, so
    slow phases of a shared machine hit all models alike. CUDA rows run in waves that fit
    on the device (``waves``). ``replay``: the GEMM job whose sustained rate is measured
    around every CPU fp32 run."""
    from tqdm import tqdm

    entries = _plan(cfg, malloc, env, cuda_rows)
    live = [e for e in entries if e.res.error is None]
    bar = tqdm(total=len(live) * (cfg.repeats + 1), desc=f"benchmark ({malloc})", unit="run")
    try:
        for wave in waves(cfg, live):
            _time_wave(cfg, malloc, wave, bar, replay)
    finally:
        bar.close()
    return [_summary(cfg, e, env) for e in entries]


def _time_wave(cfg: BenchConfig, malloc: str, live: list[_Entry], bar, replay) -> None:
    """Start, build and warm up every worker of the wave, time them round-robin, close."""
    for e in live:  # started together (imports in parallel), built one by one below
        e.job = start_job(cfg, {"kind": "encoder", "name": e.spec.name, "spec": asdict(e.spec),
                                 "device": e.dev, "dtype": e.dt, "batch_size": e.bs}, malloc)
    for e in live:
        hello = e.job.hello
        bar.update()
        if "error" in hello:
            e.res.error = str(hello["error"])[:120]
            e.job.close()
            continue
        e.res.gflops_paper_sam, e.res.gflops_full_encoder = hello["flops"]
        e.res.attention_path = hello.get("attention_path")
        e.res.build_s = hello.get("build_s", float("nan"))
        e.res.warmup_s = hello.get("warmup_s", float("nan"))
        bar.write(f"{e.spec.name} {e.dev} {e.dt} b{e.bs}: built in {e.res.build_s:.1f} s, "
                  f"{cfg.warmup} warm-up forwards in {e.res.warmup_s:.1f} s")
        if cfg.isolation == "process":
            e.res.worker_pid, e.res.worker_tuned = hello["pid"], hello["tuned"]
    live = [e for e in live if e.res.error is None]
    gc.collect()
    cpu_fp32 = [e for e in live if e.dev == "cpu" and e.dt == "fp32" and replay is not None]

    def one_run(e: _Entry) -> None:
        if e in cpu_fp32 and not e.gaps:
            e.gaps.append(replay.call("run")["s"])
        out = e.job.call("run")
        e.times.append(out["ms"])
        e.faults.append(out["faults"])
        e.peak = max(e.peak, out.get("peak_mib", 0.0))
        if e in cpu_fp32:
            e.gaps.append(replay.call("run")["s"])
        bar.update()

    def failed(e: _Entry, err: WorkerError) -> None:  # e.g. out of memory
        e.res.error = str(err)[:120]

    def profile(e: _Entry) -> None:
        e.res.op_profile = e.job.call("profile")["op_profile"]

    try:
        timed = interleaved(live, cfg.repeats, one_run, failed)
        if cfg.profile_ops:  # after the timed runs, so the profiler cannot slow them
            interleaved([e for e in timed if e.spec.backend == "eager"], 1, profile,
                        lambda e, err: print(f"warning: {e.spec.name}: profile: {err}",
                                             file=sys.stderr))
    finally:
        for e in live:
            e.job.close()


def _summary(cfg: BenchConfig, e: _Entry, env: dict[str, object]) -> Result:
    """The entry's ``Result``: median latency, faults, peak memory, share of the GEMM rate."""
    res = e.res
    if not res.error and e.times:
        t = e.times
        summarise(res, t, e.bs)
        res.minor_faults_per_forward = float(statistics.median(e.faults))
        res.peak_mem_mib = e.peak if e.dev == "cuda" else float("nan")
        if e.gaps:  # each run against the sustained GEMM rate just before and after it
            gmacs = env["gemm_gmacs"]
            rates = [gmacs / ((a + b) / 2) for a, b in zip(e.gaps, e.gaps[1:])]
            res.gemm_gmacs_per_s_runs = [round(v, 2) for v in rates]
            res.frac_of_gemm_rate = statistics.median(
                res.gflops_full_encoder * e.bs / (ms / 1e3) / rate for ms, rate in zip(t, rates))
        if (e.dev == "cpu" and cfg.cpu_memory == "probe" and e.spec.backend == "eager"
                and e.spec.kind != "timm"):
            try:
                res.peak_mem_mib = cpu_peak_memory(e.spec, cfg, e.dt, e.bs)
            except RuntimeError as err:
                print(f"warning: {e.spec.name}: {err}", file=sys.stderr)
    return res


def sweep(cfg: BenchConfig, malloc: str, extras: bool = True) -> dict[str, object]:
    """Everything timed under one allocator setting (``extras``, the last setting: the CUDA,
    photo and end-to-end rows too). With ``--isolation process`` every model and the GEMM
    probe run in worker processes started with that setting; with ``shared`` all run in this
    process, which must then have been started with it."""
    torch.set_num_threads(cfg.threads)
    shared = cfg.isolation == "shared"
    tuned = tune_glibc_malloc() if malloc == "tuned" and shared else malloc == "tuned"
    devices = cfg.devices or default_devices()
    if "cuda" in devices and not torch.cuda.is_available():
        raise SystemExit("--devices cuda asked for, but CUDA is not available")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 on every device
    torch.backends.cudnn.allow_tf32 = False
    env = environment(cfg, tuned)
    if not shared:
        env["glibc_tunables"] = GLIBC_TUNABLES if tuned else None
    bf16 = bool(BF16_ROWS & set(cfg.cpu_dtypes or cfg.dtypes)) and "cpu" in devices and (
        env["native_bf16"] or cfg.allow_emulated_bf16)
    replay_on = cfg.gemm_rate != "skip" and "cpu" in devices
    gemm = None
    if replay_on or bf16:  # the machine's matmul rates, under the same allocator setting
        gemm = start_job(cfg, {"kind": "gemm", "name": "gemm", "bf16": bf16,
                                "replay": replay_on, "student": FAMILIES[cfg.families[0]][1]},
                         malloc)
    try:
        if gemm is not None:
            if "error" in gemm.hello:
                raise RuntimeError(f"GEMM probe failed: {gemm.hello['error']}")
            env.update({k: v for k, v in gemm.hello.items() if k not in ("pid", "tuned")})
        print(json.dumps(env))
        sustained = gemm if replay_on and cfg.gemm_rate == "measure" else None
        results = run_models(cfg, malloc, env, sustained, cuda_rows=extras)
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
            if (r.device == "cpu" and r.dtype in BF16_ROWS
                    and "bf16_matmul_gmacs_per_s" in env):
                r.frac_of_gemm_rate = r.gmacs_per_s / env["bf16_matmul_gmacs_per_s"]
    out: dict[str, object] = {"environment": env, "results": [asdict(r) for r in results]}
    if cfg.photos and extras:
        out["photo_results"] = [asdict(r) for r in photo_rows(cfg, malloc)]
    if cfg.e2e and extras:
        out["e2e_results"] = e2e_rows(cfg, malloc)
    return out


def sweep_in_fresh_process(cfg: BenchConfig, mode: str, extras: bool) -> dict[str, object]:
    """``sweep`` under allocator ``mode`` in a fresh process started with it (``--isolation
    shared``: the allocator setting must be there before torch starts)."""
    from .jobs import start_sweep

    job = start_sweep(cfg, mode, extras)
    try:
        hello = job.hello
    finally:
        job.close()
    if "error" in hello:
        raise RuntimeError(f"the {mode} allocator's sweep failed: {hello['error']}")
    return hello["out"]


def main(cfg: BenchConfig) -> list[Result]:
    """The whole run: every allocator setting, ratios, tables, JSON and plot (atomic)."""
    modes = malloc_modes(cfg)
    if cfg.onnx and not cfg.skip_models:
        export_onnx_rows(cfg)  # once, before the timed processes
    os.makedirs(cfg.output_dir, exist_ok=True)
    if cfg.isolation == "process" or (
            len(modes) == 1 and (modes[0] == "default" or tunables_active())):
        outs = [sweep(cfg, mode, mode == modes[-1]) for mode in modes]
    else:  # shared: a fresh process per allocator setting, with the same settings otherwise
        outs = [sweep_in_fresh_process(cfg, mode, mode == modes[-1]) for mode in modes]
    results = [r for o in outs for r in from_dicts(o["results"])]
    photos = [r for o in outs for r in from_dicts(o.get("photo_results", []))]
    e2e = [r for o in outs for r in o.get("e2e_results", [])]
    env = dict(outs[-1]["environment"])
    env["malloc_modes"] = modes
    env["isolation"] = cfg.isolation
    env["loadavg_end"] = loadavg()
    env["per_mode"] = {m: o["environment"] for m, o in zip(modes, outs)}
    add_ratios(results)
    table = headline(results, env) if results else ""
    for mode in modes:
        rows = [r for r in results if r.malloc == mode]
        if rows:
            table += f"\n### glibc allocator: {mode}\n\n" + markdown_table(
                rows, env["per_mode"][mode])
    if cfg.profile_ops:
        table += "\n" + op_profile_table(results)
    if photos:
        table += "\n" + photo_table(photos)
    if e2e:
        table += "\n" + e2e_table(e2e)
    write_text_atomic(os.path.join(cfg.output_dir, "benchmark.md"), table)
    write_json_atomic({"environment": env, "args": cfg.as_dict(),
                       "results": [asdict(r) for r in results],
                       "photo_results": [asdict(r) for r in photos],
                       "e2e_results": e2e}, os.path.join(cfg.output_dir, "benchmark.json"),
                      indent=1)
    if results:
        plot([r for r in results if r.malloc == modes[-1] and r.backend == "eager"],
             os.path.join(cfg.output_dir, "benchmark.png"))
    print(table)
    print(f"wrote {cfg.output_dir}/benchmark.{{md,json,png}}")
    return results + photos
