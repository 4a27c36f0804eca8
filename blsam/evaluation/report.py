"""Outputs: the JSON record of a run and its row of the paper's Table 2 in Markdown.

Why one row per run: each protocol is a separate (long) run; rows of the same model are merged
by ``table_markdown`` (``eval/zero_shot.py --table out/*.json``) into the full table.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Dict, Iterable, List, Optional

TABLE_COLUMNS = ("Model", "GFLOPs", "1 pt mIoU", "3 pts mIoU", "box mIoU", "AP")
DISPLAY_NAMES = {"b_t": "Ours (B + T)", "h_b": "Ours (H + B)", "vit_b": "ViT-B",
                 "vit_l": "ViT-L", "vit_h": "ViT-H"}
DASH = "–"


def file_sha256(path: Optional[str], n: int = 12) -> Optional[str]:
    """First ``n`` hex digits of a file's SHA-256 (which weights produced the numbers)."""
    if not path or not os.path.isfile(path):
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:n]


def table_column(result: Dict[str, Any]) -> Optional[str]:
    """Which Table 2 column a run's headline metric fills (None: not a Table 2 setting)."""
    cfg = result["config"]
    if cfg["prompt"] == "detector":
        return "AP"
    if cfg["prompt"] == "box":
        return "box mIoU"
    if cfg.get("num_clicks"):
        return None
    return {1: "1 pt mIoU", 3: "3 pts mIoU"}.get(cfg["num_points"])


def headline(result: Dict[str, Any]) -> Optional[float]:
    """mIoU x 100 or AP, as the paper prints them."""
    m = result["metrics"]
    if result["config"]["prompt"] == "detector":
        return m.get("AP")
    return None if m.get("mIoU") is None else 100.0 * m["mIoU"]


def _fmt(v: Optional[float]) -> str:
    return DASH if v is None else f"{v:.1f}"


def table_markdown(results: Iterable[Dict[str, Any]]) -> str:
    """Markdown table shaped like Table 2; runs of the same model name share a row."""
    rows: Dict[str, Dict[str, str]] = {}
    for r in results:
        row = rows.setdefault(r["name"], {c: DASH for c in TABLE_COLUMNS})
        row["Model"] = r["name"]
        if r.get("gflops") is not None:
            row["GFLOPs"] = f"{r['gflops']:.1f}"
        col = table_column(r)
        if col is not None:
            row[col] = _fmt(headline(r))
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |",
             "|" + "|".join("---" if c == "Model" else "---:" for c in TABLE_COLUMNS) + "|"]
    lines += ["| " + " | ".join(row[c] for c in TABLE_COLUMNS) + " |" for row in rows.values()]
    return "\n".join(lines) + "\n"


def run_tag(cfg: Dict[str, Any]) -> str:
    """File stem of a run's outputs, e.g. ``b_t_lvis_3pt`` or ``vit_h_coco_detector``."""
    p = cfg["prompt"]
    proto = f"{cfg['num_points']}pt" if p == "point" else p
    if p == "point" and cfg.get("point_from") == "center":
        proto += "_center"
    if cfg.get("oracle") and p == "point":
        proto += "_oracle"
    if cfg.get("num_clicks"):
        proto += f"_{cfg['num_clicks']}clicks"
    return f"{cfg['model']}_{cfg['dataset']}_{proto}"


def write_outputs(result: Dict[str, Any], output_dir: str) -> Dict[str, str]:
    """``<tag>.json`` and ``<tag>.md`` in ``output_dir``; returns their paths."""
    os.makedirs(output_dir, exist_ok=True)
    tag = run_tag(result["config"])
    jpath = os.path.join(output_dir, tag + ".json")
    mpath = os.path.join(output_dir, tag + ".md")
    with open(jpath, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2, sort_keys=False)
    with open(mpath, "w", encoding="utf-8") as f:
        f.write(table_markdown([result]))
    return {"json": jpath, "markdown": mpath}


def write_predictions(items: List[Dict[str, Any]], path: str) -> str:
    """JSON lines (``.jsonl``) or one JSON list (any other suffix); masks are COCO RLE."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    clean = [{k: v for k, v in it.items() if k != "key"} for it in items]
    with open(path, "w", encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            for it in clean:
                f.write(json.dumps(it) + "\n")
        else:
            json.dump(clean, f)
    return path
