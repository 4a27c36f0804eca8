"""What the specs (``blsam.specs``) print: a model's per-layer summary and the
paper-convention GFLOPs table beside the paper's Table 2 column, as ``blsam-specs`` shows them
and ``docs/architecture.md`` quotes them."""
from __future__ import annotations

from collections.abc import Sequence

from .modeling.pruning import tokens_kept
from .modeling.routing import check_keep_ratio, tokens_per_window
from .specs import ABLATION_ORDER, MODEL_SPECS, ModelSpec, check_img_size, get_spec


def _pruning_modes(spec: ModelSpec) -> list[str]:
    """Per layer of a pruning baseline: what it runs on (the table's mode column)."""
    pr = spec.pruning
    out = []
    for i in range(spec.encoder.depth):
        if pr.method == "evit":
            out.append("dense" if i < pr.layers[0] else "cut" if i == pr.layers[0] else "kept")
        else:
            out.append("dense" if i < pr.layers[0] else "select" if i in pr.layers else "kept")
    return out


def layer_table(name: str, img_size: int = 1024, keep_ratio: float | None = None) -> str:
    """Per-layer summary: mode, attention, widths, and where predictors score the tokens."""
    spec = get_spec(name)
    e = spec.encoder
    keep_ratio = spec.default_keep_ratio if keep_ratio is None else keep_ratio
    grid = check_img_size(img_size) // e.patch_size
    if spec.is_pruning:
        k = tokens_kept(spec.pruning.method, check_keep_ratio(keep_ratio), (grid, grid),
                        e.window_size)
        modes = _pruning_modes(spec)
    else:
        k = tokens_per_window(check_keep_ratio(keep_ratio), (grid, grid), e.window_size)
        modes = list(e.layer_modes)
    lines = [f"{spec.name} ({spec.display_name}): {e.depth} layers, P dim {e.embed_dim} "
             f"({e.num_heads} heads)" + (f", E dim {e.e_dim} ({e.e_heads} heads)" if e.e_dim
                                         else "")
             + (f", teacher {spec.teacher}" if spec.teacher else ""),
             f"img_size {img_size}: {grid}x{grid} tokens, window {e.window_size}, "
             f"keep_ratio {keep_ratio}: k = {k} of {e.window_size ** 2} per window",
             f"{'layer':>5}  {'mode':<10}  {'attention':<9}  predictor"]
    if spec.is_pruning:
        lines[0] += f", pruning {spec.pruning.method} (kept tokens attend to kept tokens)"
    for i, mode in enumerate(modes):
        attn = "global" if i in e.global_attn_indexes else "window"
        pred = "scores tokens after" if i in e.predictor_after else ""
        lines.append(f"{i + 1:>5}  {mode:<10}  {attn:<9}  {pred}".rstrip())
    return "\n".join(lines)


def paper_gflops(name: str, img_size: int = 1024, keep_ratio: float | None = None) -> float:
    """Paper-convention GFLOPs of registry model ``name`` (computed, never typed)."""
    from .flops import count_gflops
    from .testing import sam_with_meta_encoder

    spec = get_spec(name)
    kwargs = {"img_size": img_size}
    if spec.has_keep_ratio:
        kwargs["keep_ratio"] = spec.default_keep_ratio if keep_ratio is None else keep_ratio
    return count_gflops(sam_with_meta_encoder(name, **kwargs), "paper")


# the paper's Table 2 GFLOPs column (typed here once; ours are computed by ``paper_gflops``)
PAPER_TABLE2_GFLOPS: dict[str, float] = {
    "vit_b": 372.0, "vit_h": 2736.6, "evovit_b": 266.0, "evit_b": 216.4, "b_t": 210.5,
    "evovit_h": 1840.5, "evit_h": 1597.2, "h_b": 1993.3,
}


def gflops_table(names: Sequence[str] | None = None, img_size: int = 1024) -> str:
    """Markdown: every model's paper-convention GFLOPs at its default keep ratio, ordered as
    the paper's GFLOPs column, the paper's Table 2 number beside ours where it gives one
    (Table-3 ablation steps on SAM: the paper gives none)."""
    names = list(names) if names is not None else [
        n for n, s in MODEL_SPECS.items() if not s.test_only]
    rows = []
    for n in names:
        spec = get_spec(n)
        ours = paper_gflops(n, img_size)
        paper = PAPER_TABLE2_GFLOPS.get(n) if img_size == 1024 else None
        step = "; ".join(([] if paper is None else ["Table 2"]) + (
            [f"ablation step {ABLATION_ORDER.index(n) + 1}"] if n in ABLATION_ORDER else []))
        keep = f"{spec.default_keep_ratio:g}" if spec.has_keep_ratio else "–"
        diff = f"{100 * (ours / paper - 1):+.1f}%" if paper else "–"
        rows.append((ours, f"| `{n}` | {spec.display_name} | {keep} | {ours:.1f} | "
                           f"{paper if paper else '–'} | {diff} | {step} |"))
    head = ["| model | name | keep ratio | GFLOPs (ours) | GFLOPs (paper) | diff | row |",
            "|---|---|---:|---:|---:|---:|---|"]
    return "\n".join(head + [r for _, r in sorted(rows)])
