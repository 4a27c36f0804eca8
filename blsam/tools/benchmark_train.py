"""Training-throughput benchmark: where a distillation step's time goes.

Everything runs in one process on synthetic SA-1B-format shards and random weights (timing does
not depend on weight values), and each headline is a ratio measured in the same run:

1. teacher forward: the training teacher (fused encoder, inference mode) vs SAM's official
   ``ImageEncoderViT`` on the same input, interleaved repeats, median;
2. packed teacher cache: read throughput (embeddings/s) of random-order reads through the
   memory-mapped reader, next to one ``torch.load`` per image file (the old layout);
3. training step with the packed cache (``train()`` itself, per-step phase timers) vs the
   student's forward+backward alone on the same batches; data-wait share with N workers.

    flock /tmp/blsam-cpu.lock python tools/benchmark_train.py --output docs/benchmarks/train_cpu

Writes ``<output>.json`` and ``<output>.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

import torch

from blsam.build_blsam import build_vanilla_sam
from blsam.specs import TEACHER_OF, check_img_size, default_keep_ratio
from blsam.utils.cli import OptionError, check_device, one_line_parse_errors, run_cli
from blsam.utils.dist import synchronize


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a = p.add_argument
    a("--model", default="b_t", choices=sorted(TEACHER_OF))
    a("--img-size", type=int, default=512)
    a("--batch-size", type=int, default=2)
    a("--repeats", type=int, default=5, help="teacher forward repeats (after 1 warm-up)")
    a("--steps", type=int, default=8, help="training steps; the first is warm-up")
    a("--num-workers", type=int, default=2)
    a("--masks-per-image", type=int, default=16)
    a("--photo-size", type=int, default=1024, help="longest side of the synthetic photos")
    a("--cache-rows", type=int, default=256, help="rows for the cache read benchmark")
    a("--cache-img-size", type=int, default=1024, help="row shape of the read benchmark")
    a("--work-dir", default=None, help="scratch folder (default: a temp dir, deleted)")
    a("--output", default=None, help="write <output>.json and <output>.md")
    a("--parts", nargs="+", default=["teacher", "cache", "step"],
      choices=["teacher", "cache", "step"])
    a("--device", default="cpu", help="cpu | cuda[:N]: where the teacher, the cache writer and "
      "the training steps run (data_wait_share says whether --num-workers keep a GPU fed)")
    a("--amp", default="none", choices=("none", "auto", "bf16", "fp16"),
      help="training precision, as blsam-train's --amp (auto: bf16 where native, else fp16)")
    return p


def check_args(args: argparse.Namespace) -> None:
    for name in ("batch_size", "repeats", "num_workers", "masks_per_image", "cache_rows"):
        if getattr(args, name) < (0 if name == "num_workers" else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be >= "
                             f"{0 if name == 'num_workers' else 1}")
    if args.steps < 2:
        raise ValueError("--steps must be >= 2 (the first one is warm-up)")
    for name in ("img_size", "cache_img_size"):
        check_img_size(getattr(args, name), f"--{name.replace('_', '-')}")
    check_device(args.device)


def _median_ms(xs: list[float]) -> float:
    return 1000 * statistics.median(xs)


def bench_teacher(args: argparse.Namespace, ckpt: str) -> dict[str, Any]:
    """Official encoder vs the training teacher, interleaved, same input."""
    from blsam.train.teacher import Teacher

    variant, dev = TEACHER_OF[args.model], torch.device(args.device)
    official = build_vanilla_sam(variant, ckpt, img_size=args.img_size).image_encoder.eval()
    official = official.to(dev)
    teacher = Teacher(variant, ckpt, args.img_size, dev)
    teacher.build()
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size,
                    generator=torch.Generator().manual_seed(0)).to(dev)
    t_off: list[float] = []
    t_ours: list[float] = []
    for i in range(args.repeats + 1):
        synchronize(dev)
        t0 = time.perf_counter()
        with torch.no_grad():
            ref = official(x)
        synchronize(dev)
        t1 = time.perf_counter()
        got = teacher.encode(x)
        synchronize(dev)
        t2 = time.perf_counter()
        if i:  # the first pair is warm-up
            t_off.append(t1 - t0)
            t_ours.append(t2 - t1)
    cos = torch.nn.functional.cosine_similarity(got.flatten(1), ref.flatten(1), dim=1).min()
    # the median of per-pair ratios: each teacher run against the official run just before
    # it, so the machine's slow speed drift (tens of percent on a shared VM) cancels
    return {"official_ms": _median_ms(t_off), "teacher_ms": _median_ms(t_ours),
            "ratio": statistics.median(t / o for t, o in zip(t_ours, t_off)),
            "ratio_of_medians": statistics.median(t_ours) / statistics.median(t_off),
            "official_ms_all": [1000 * t for t in t_off],
            "teacher_ms_all": [1000 * t for t in t_ours], "min_cos_sim": cos.item()}


def bench_cache(args: argparse.Namespace, work: str) -> dict[str, Any]:
    """Random-order reads: packed memmap rows vs one torch.load per image file."""
    from blsam.train.packed_cache import DTYPE, FORMAT, PackedCache, PartWriter, write_index

    s = args.cache_img_size // 16
    meta = {"format": FORMAT, "teacher": "synthetic", "teacher_sha256": "0" * 64,
            "img_size": args.cache_img_size, "shape": [256, s, s], "dtype": "float16"}
    packed, loose = os.path.join(work, "packed"), os.path.join(work, "loose")
    os.makedirs(loose, exist_ok=True)
    keys = [f"sa_{i}" for i in range(args.cache_rows)]
    g = torch.Generator().manual_seed(0)
    w = PartWriter(packed, 0, 1, meta)
    for k in keys:
        e = torch.randn(256, s, s, generator=g).half()
        w.append(k, e)
        torch.save(e, os.path.join(loose, k + ".pt"))
    w.close()
    write_index(packed, 1, meta)
    order = keys[:]
    random.Random(0).shuffle(order)
    reader = PackedCache(packed)
    t0 = time.perf_counter()
    total = 0.0
    for k in order:
        total += float(reader.get(k)[0, 0, 0])
    t_packed = time.perf_counter() - t0
    t0 = time.perf_counter()
    for k in order:
        total += float(torch.load(os.path.join(loose, k + ".pt"), weights_only=True)[0, 0, 0])
    t_loose = time.perf_counter() - t0
    mib = 256 * s * s * DTYPE().itemsize / 2 ** 20
    return {"rows": args.cache_rows, "row_shape": [256, s, s], "row_mib": mib,
            "packed_emb_per_s": args.cache_rows / t_packed,
            "packed_mib_per_s": args.cache_rows * mib / t_packed,
            "loose_files_emb_per_s": args.cache_rows / t_loose,
            "note": "files just written: reads come from the page cache"}


def _train_args(args: argparse.Namespace, data: str, ckpt: str, cache: str, out: str
                ) -> argparse.Namespace:
    from blsam.train.options import build_parser as train_parser

    return train_parser().parse_args([
        "--data", data, "--data-fraction", "1", "--sam-checkpoint", ckpt, "--model", args.model,
        "--img-size", str(args.img_size), "--batch-size", str(args.batch_size),
        "--masks-per-image", str(args.masks_per_image), "--num-workers", str(args.num_workers),
        "--teacher-cache", cache, "--max-steps", str(args.steps), "--log-every", "1",
        "--save-every", str(10 ** 6), "--warmup-steps", "1", "--output-dir", out,
        "--no-progress", "--device", args.device, "--amp", args.amp])


def bench_step(args: argparse.Namespace, work: str, ckpt: str) -> dict[str, Any]:
    """train() with the packed cache vs DistillModel forward+backward on the same batches."""
    from blsam import blsam_model_registry
    from blsam.train.cache import CacheConfig, cache_teacher
    from blsam.train.config import TrainConfig
    from blsam.train.data import EpochBatchSampler, SA1BDataset, collate, select_records
    from blsam.train.distill import DistillModel, set_trainable
    from blsam.train.tiny_sa1b import write_tiny_sa1b
    from blsam.train.trainer import train

    n_img = args.steps * args.batch_size
    data, cache = os.path.join(work, "data"), os.path.join(work, "cache")
    write_tiny_sa1b(data, num_shards=2, images_per_shard=-(-n_img // 2), size=args.photo_size,
                    masks_per_image=max(args.masks_per_image, 2) + 4)
    cache_teacher(CacheConfig(
        data=data, data_fraction=1.0, sam_checkpoint=ckpt, model=args.model,
        img_size=args.img_size, output=cache, num_workers=0, device=args.device,
        batch_size=args.batch_size))
    targs = _train_args(args, data, ckpt, cache, os.path.join(work, "run"))

    def fwd_bwd_alone() -> float:
        """Mean forward+backward of the student on batches 2..N (same build, same order)."""
        from blsam.train.loader import normalize_images
        from blsam.train.precision import amp_dtype

        dev = torch.device(args.device)
        dtype = amp_dtype(args.amp, dev)
        torch.manual_seed(targs.seed)
        sam = blsam_model_registry[args.model](  # the keep ratio train() resolves
            sam_checkpoint=ckpt, keep_ratio=targs.keep_ratio or default_keep_ratio(args.model),
            img_size=args.img_size)
        set_trainable(sam, targs.trainable)
        sam.to(dev).train()
        model = DistillModel(sam, targs.lambda_fd)
        recs, _ = select_records(data, None, 1.0, targs.seed)
        ds = SA1BDataset(recs, args.img_size, args.masks_per_image, targs.prompt_types,
                         targs.max_points, targs.seed, cache)
        sampler = EpochBatchSampler(len(ds), args.batch_size, 0, 1, targs.seed)
        per_epoch = len(sampler)
        fb: list[float] = []
        for s in range(args.steps):
            sampler.set_position(s // per_epoch, s % per_epoch)
            batch = collate([ds[i] for i in next(iter(sampler))])
            t_emb = torch.stack(batch["teacher"]).float().to(dev)
            images = normalize_images(batch["image"].to(dev), batch["hw"])
            synchronize(dev)
            t0 = time.perf_counter()
            with torch.autocast(dev.type, dtype=dtype or torch.float32,
                                enabled=dtype is not None):
                out = model(images, batch, t_emb)
            out["loss"].backward()
            synchronize(dev)
            dt = time.perf_counter() - t0
            sam.zero_grad(set_to_none=True)
            if s:  # the first batch is warm-up, as in the training run
                fb.append(dt)
        return statistics.mean(fb)

    before = fwd_bwd_alone()  # before and after the run: the machine drifts between runs
    summary = train(TrainConfig.from_options(vars(targs)))
    after = fwd_bwd_alone()
    hist = summary["history"][1:]  # step 1 is warm-up
    assert not summary["teacher_built"]
    phases = ("data", "teacher", "forward", "backward", "optimizer")
    step = {p: statistics.mean(h[f"time_{p}"] for h in hist) for p in phases}
    step_time = statistics.mean(h["time_step"] for h in hist)
    fwd_bwd = (before + after) / 2
    in_loop = step["forward"] + step["backward"]
    return {"steps_timed": len(hist), "step_s": step_time,
            "phases_s": step, "fwd_bwd_alone_s": fwd_bwd,
            "fwd_bwd_alone_before_after_s": [before, after],
            "step_over_fwd_bwd": step_time / fwd_bwd,
            "step_over_fwd_bwd_in_loop": step_time / in_loop,
            "data_wait_share": statistics.mean(h["data_wait_share"] for h in hist),
            "optimizer_share": step["optimizer"] / step_time,
            "images_per_s": statistics.mean(h["global_images_per_s"] for h in hist),
            "num_workers": args.num_workers}


def markdown(res: dict[str, Any]) -> str:
    c = res["config"]
    dev, amp = c.get("device", "cpu"), c.get("amp", "none")
    lines = [f"# Training throughput on {'CPU' if dev == 'cpu' else dev} ({c['model']}, "
             f"{c['img_size']}², batch {c['batch_size']}, "
             f"{'fp32' if amp == 'none' else 'amp ' + amp})", "",
             f"`{res['command']}` — {res['machine']}", ""]
    if "teacher" in res:
        t = res["teacher"]
        lines += ["## Teacher forward (target <= 0.65x the official encoder)", "",
                  "| encoder | median ms / batch |", "|---|---|",
                  f"| official `ImageEncoderViT` | {t['official_ms']:.0f} |",
                  f"| training teacher (fused, inference mode) | {t['teacher_ms']:.0f} |",
                  f"| ratio of the medians | {t['ratio_of_medians']:.2f}x |",
                  f"| **ratio, median of the {len(t['teacher_ms_all'])} interleaved pairs** "
                  f"| **{t['ratio']:.2f}x** |", "",
                  f"min cos-sim teacher vs official: {t['min_cos_sim']:.6f}", ""]
    if "cache" in res:
        k = res["cache"]
        lines += ["## Packed teacher cache reads", "",
                  f"{k['rows']} rows of {k['row_shape']} fp16 ({k['row_mib']:.1f} MiB each), "
                  f"random order, {k['note']}:", "",
                  "| layout | embeddings/s |", "|---|---|",
                  f"| packed (np.memmap row copy) | {k['packed_emb_per_s']:.0f} "
                  f"({k['packed_mib_per_s']:.0f} MiB/s) |",
                  f"| one .pt file per image (torch.load) | {k['loose_files_emb_per_s']:.0f} |",
                  ""]
    if "step" in res:
        s = res["step"]
        ph = s["phases_s"]
        lines += ["## Training step with the packed cache", "",
                  f"`train()` itself, {s['steps_timed']} timed steps after 1 warm-up, "
                  f"{s['num_workers']} loader workers; per-step phase times from its "
                  "`time_*` log fields:", "",
                  "| phase | s / step |", "|---|---|",
                  *[f"| {p} | {v:.3f} |" for p, v in ph.items()],
                  f"| **step** | **{s['step_s']:.3f}** |",
                  f"| student forward+backward alone, same batches (mean of a run before "
                  f"and one after: {s['fwd_bwd_alone_before_after_s'][0]:.3f}, "
                  f"{s['fwd_bwd_alone_before_after_s'][1]:.3f}) | {s['fwd_bwd_alone_s']:.3f} |",
                  "",
                  "| target | measured | met |", "|---|---|---|",
                  f"| step <= 1.05x forward+backward | {s['step_over_fwd_bwd']:.3f}x | "
                  f"{'yes' if s['step_over_fwd_bwd'] <= 1.05 else 'no'} |",
                  f"| step <= 1.05x the forward+backward phases of the same steps | "
                  f"{s['step_over_fwd_bwd_in_loop']:.3f}x | "
                  f"{'yes' if s['step_over_fwd_bwd_in_loop'] <= 1.05 else 'no'} |",
                  f"| data wait <= 5% of step | {100 * s['data_wait_share']:.1f}% | "
                  f"{'yes' if s['data_wait_share'] <= 0.05 else 'no'} |",
                  "", f"optimizer step share: {100 * s['optimizer_share']:.1f}%; "
                  f"images/s: {s['images_per_s']:.2f}", ""]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> dict[str, Any]:
    check_args(args)
    from blsam.testing import save_random_sam_checkpoint

    work = args.work_dir or tempfile.mkdtemp(prefix="blsam_bench_train_")
    os.makedirs(work, exist_ok=True)
    res: dict[str, Any] = {
        "config": {k: v for k, v in vars(args).items() if k not in ("output", "work_dir")},
        "command": "python tools/benchmark_train.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, "
                   f"{torch.get_num_threads()} torch threads, torch {torch.__version__}"}
    try:
        ckpt = save_random_sam_checkpoint(TEACHER_OF[args.model], os.path.join(work, "sam.pth"))
        if "teacher" in args.parts:
            res["teacher"] = bench_teacher(args, ckpt)
            print(f"teacher: {res['teacher']['ratio']:.3f}x official", flush=True)
        if "cache" in args.parts:
            res["cache"] = bench_cache(args, work)
            print(f"cache: {res['cache']['packed_emb_per_s']:.0f} emb/s", flush=True)
        if "step" in args.parts:
            res["step"] = bench_step(args, work, ckpt)
            print(f"step: {res['step']['step_over_fwd_bwd']:.3f}x fwd+bwd, data wait "
                  f"{100 * res['step']['data_wait_share']:.1f}%", flush=True)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output + ".json", "w", encoding="utf-8") as f:
            json.dump(res, f, indent=1)
        with open(args.output + ".md", "w", encoding="utf-8") as f:
            f.write(markdown(res))
    print(markdown(res))
    return res


def cli(argv: list[str] | None = None) -> int:
    """A user error is one ``error:`` line and exit 2."""

    def body() -> None:
        args = one_line_parse_errors(build_parser()).parse_args(argv)
        try:
            check_args(args)
        except ValueError as e:
            raise OptionError(str(e)) from None
        main(args)

    return run_cli(body, extra="train", argv=argv)


if __name__ == "__main__":
    sys.exit(cli())
