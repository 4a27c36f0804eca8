"""The Markdown tables and the plot of a run."""
from __future__ import annotations

from blsam.specs import FAMILIES
from blsam.utils.files import atomic_write

from .results import Result


def fmt(x: float, nd: int = 2) -> str:
    return "–" if x != x else f"{x:.{nd}f}"


def headline(results: list[Result], env: dict[str, object]) -> str:
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


def markdown_table(results: list[Result], env: dict[str, object]) -> str:
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
    slow = max((r for r in results if r.build_s == r.build_s),
               key=lambda r: r.build_s + r.warmup_s, default=None)
    if slow is not None:
        lines += ["", f"Slowest start: {slow.model} {slow.dtype} (built and FLOP-counted in "
                      f"{slow.build_s:.0f} s, fp32 whatever the dtype; {env['warmup']} warm-up "
                      f"forwards in {slow.warmup_s:.0f} s); every row's times are in the JSON "
                      f"(build_s, warmup_s)."]
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
        lines += ["", f"bf16 rows: model cast with `.to(torch.bfloat16)`; autocast rows: fp32 "
                      f"weights under `torch.autocast('cpu', torch.bfloat16)`; for both, "
                      f"**of GEMM rate** is "
                      f"over a bf16 (M, 768) x (768, 3072) matmul timed in the same run: "
                      f"{env['bf16_matmul_gmacs_per_s']:.1f} GMAC/s (fp32: "
                      f"{env['fp32_matmul_gmacs_per_s']:.1f})."]
    return "\n".join(lines) + "\n"


def photo_table(rows: list[Result]) -> str:
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


def e2e_table(rows: list[dict[str, object]]) -> str:
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


def op_profile_table(results: list[Result]) -> str:
    """``--profile-ops``: one forward's self CPU ms per op class, per model and dtype."""
    from .profile import CLASSES

    rows = [r for r in results if r.op_profile]
    if not rows:
        return ""
    lines = ["Per-op profile (`--profile-ops`): self CPU time of one forward per op class, "
             "ms (torch.profiler, after the timed runs; the profiler adds overhead, so compare "
             "rows, not with the latencies above)", "",
             "| model | dtype | malloc | attention path | " + " | ".join(CLASSES)
             + " | total |", "|---|---|---|---|" + "---:|" * (len(CLASSES) + 1)]
    for r in rows:
        lines.append(f"| {r.model} | {r.dtype} | {r.malloc} | {r.attention_path or '–'} | "
                     + " | ".join(f"{r.op_profile.get(c, 0.0):.1f}" for c in CLASSES)
                     + f" | {r.op_profile.get('total', 0.0):.1f} |")
    return "\n".join(lines) + "\n"


def plot(results: list[Result], path: str) -> None:
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
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
