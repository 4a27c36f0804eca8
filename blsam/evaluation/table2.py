"""The paper's Table 2 beside ours (``blsam-eval --table ... --paper``).

All eight rows appear in the paper's order; ours is the full default-protocol run of each model
at its default keep ratio (a model without a result still gets its row, GFLOPs computed by
``blsam.spec_tables.paper_gflops``, metrics "–"), followed by the paper's row. Other runs (ablation
steps, other keep ratios, labelled protocols) follow the Table-2 block.
"""
from __future__ import annotations

from blsam.spec_tables import PAPER_TABLE2_GFLOPS

# The paper's Table 2 metrics (1 point, 3 points, box: LVIS mIoU; zero-shot instance
# segmentation: COCO mask AP), typed once from the paper; its GFLOPs column is
# ``blsam.spec_tables.PAPER_TABLE2_GFLOPS``; ours are computed
PAPER_TABLE2: dict[str, tuple[float, float, float, float]] = {
    "vit_b": (53.6, 65.2, 76.6, 40.2),
    "vit_h": (59.4, 70.7, 80.4, 46.1),
    "evovit_b": (39.9, 61.4, 71.1, 30.7),
    "evit_b": (40.1, 60.8, 70.1, 32.4),
    "b_t": (52.0, 71.1, 78.1, 39.2),
    "evovit_h": (42.3, 63.1, 72.5, 38.8),
    "evit_h": (40.5, 62.7, 72.2, 39.5),
    "h_b": (58.6, 72.6, 81.4, 45.0),
}
PAPER_COLUMNS = ("1 pt mIoU", "3 pts mIoU", "box mIoU", "COCO AP")


def _is_default_row(key: tuple, model: str, img_size: int) -> bool:
    from blsam.specs import get_spec

    spec = get_spec(model)
    keep, variant = key[3], key[5]
    default = spec.default_keep_ratio if spec.has_keep_ratio else None
    same_keep = keep is None if default is None else keep is not None and abs(
        keep - default) < 1e-9
    return key[1] == model and variant == "" and key[4] == img_size and same_keep


def paper_section(order: list[tuple], rows: dict[tuple, dict[str, str]], columns: tuple[str, ...],
                  dash: str, img_size: int) -> list[tuple]:
    """Add the paper's rows (and ours where missing) to ``rows``; returns the new order."""
    from blsam.spec_tables import paper_gflops
    from blsam.specs import get_spec

    out: list[tuple] = []
    for model, values in PAPER_TABLE2.items():
        name = get_spec(model).display_name
        ours = [k for k in order if _is_default_row(k, model, img_size)]
        if not ours:
            k = ("no result", model)
            rows[k] = {c: dash for c in columns}
            rows[k].update(Model=f"{name} (ours: no result)", GFLOPs=f"{paper_gflops(model):.1f}")
            ours = [k]
        out += ours
        pk = ("paper", model)
        rows[pk] = {c: dash for c in columns}
        rows[pk].update({c: f"{v:.1f}" for c, v in zip(PAPER_COLUMNS, values, strict=True)})
        rows[pk]["GFLOPs"] = f"{PAPER_TABLE2_GFLOPS[model]:.1f}"
        rows[pk]["Model"] = f"{name} (paper)"
        out.append(pk)
    return out + [k for k in order if k not in out]
