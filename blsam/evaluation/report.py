"""Outputs: the JSON record of a run, its rows of the paper's Table 2 in Markdown, and the
quality-vs-cost curve of a ``--keep-ratios`` run.

Why rows are keyed, not just named: results made differently (another checkpoint, keep ratio,
image size, protocol, dataset or a ``--limit``) must never share a cell. Only full runs of the
paper's protocol fill the paper's columns; every other run gets its own labelled row, and two
files claiming the same cell are an error naming both.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

from ..utils.files import write_json_atomic, write_text_atomic
from .results import (  # noqa: F401  (RESULT_KIND re-exported: the kinds live in results)
    CURVE_KIND,
    FORMAT,
    RESULT_KIND,
    EvalResult,
    ResultFormatError,
)

TABLE_COLUMNS = ("Model", "GFLOPs", "1 pt mIoU", "3 pts mIoU", "box mIoU", "COCO AP", "LVIS AP")
DEFAULT_KEEP, DEFAULT_IMG_SIZE = 0.25, 1024
DASH = "–"
class TableError(ResultFormatError):
    """Result files that cannot be put in one table (unreadable, wrong shape, colliding)."""


# --------------------------------------------------------------------------- reading results
def check_result(r: Any, where: str) -> dict[str, Any]:
    """``r`` if it is a result record ``EvalResult.from_json`` reads (formats 1 to ``FORMAT``),
    else ``TableError`` saying why."""
    try:
        EvalResult.from_json(r, where)
    except TableError:
        raise
    except ResultFormatError as e:
        raise TableError(str(e)) from None
    return r


def load_results(paths: Sequence[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """Result records of ``paths`` (each remembers its ``_file``) and the curve files skipped."""
    results, skipped = [], []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except OSError as e:
            raise TableError(f"{path}: cannot read: {e.strerror or e}") from e
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TableError(f"{path}: not a JSON file ({e})") from e
        if isinstance(data, dict) and data.get("kind") == CURVE_KIND:
            skipped.append(path)
            continue
        results.append(dict(check_result(data, path), _file=path))
    return results, skipped


# --------------------------------------------------------------------------- table
def table_column(result: dict[str, Any]) -> str:
    """The Table 2 column of a run's headline metric."""
    proto = result["protocol"]
    if proto["prompt"] == "detector":
        return "LVIS AP" if result["dataset_kind"] == "lvis" else "COCO AP"
    if proto["prompt"] == "box":
        return "box mIoU"
    col = {1: "1 pt mIoU", 3: "3 pts mIoU"}.get(proto.get("num_points"))
    if col is None:
        raise TableError(f"{result.get('_file', result['name'])}: Table 2 has no column for "
                         f"{proto.get('num_points')} points")
    return col


def headline(result: dict[str, Any]) -> float | None:
    """mIoU x 100 or AP, as the paper prints them."""
    m = result["metrics"]
    if result["protocol"]["prompt"] == "detector":
        return m.get("AP")
    return None if m.get("mIoU") is None else 100.0 * m["mIoU"]


def variant(result: dict[str, Any]) -> str:
    """What makes a run not a paper-column run ('' for a full run of the paper's protocol)."""
    parts = []
    proto = result["protocol"]
    if not proto["paper_default"]:
        parts.append(proto.get("label") or "non-default protocol")
    if proto["prompt"] != "detector" and result["dataset_kind"] != "lvis":
        parts.append(result["dataset_kind"].upper())
    limit = result.get("limit")
    if limit is not None:
        parts.append(f"first {limit} images")
    c = result["counts"]
    skipped = c.get("missing_images", 0) + c.get("bad_images", 0)
    if skipped:
        parts.append(f"{skipped} images skipped")
    if c.get("bad_annotations"):
        parts.append(f"{c['bad_annotations']} bad annotations skipped")
    if result.get("images", {}).get("exif_orientation", "ignore") != "ignore":
        parts.append("EXIF orientation applied")
    if result.get("amp") not in (None, "fp32"):
        parts.append(str(result["amp"]))
    return ", ".join(parts)


def row_key(result: dict[str, Any]) -> tuple[Any, ...]:
    """Runs with equal keys share a table row."""
    keep = result.get("keep_ratio")
    return (result["name"], result["model"],
            result.get("checkpoint_sha256") or result.get("checkpoint"),
            None if keep is None else round(float(keep), 6), result["img_size"], variant(result))


def _label(result: dict[str, Any]) -> str:
    label = result["name"]
    keep = result.get("keep_ratio")
    extra = []
    if keep is not None and abs(keep - DEFAULT_KEEP) > 1e-9:
        extra.append(f"keep {keep:g}")
    if result["img_size"] != DEFAULT_IMG_SIZE:
        extra.append(f"{result['img_size']} px")
    if extra:
        label += " (" + ", ".join(extra) + ")"
    v = variant(result)
    return label + (f" [{v}]" if v else "")


def _fmt(v: float | None) -> str:
    return DASH if v is None else f"{v:.1f}"


def table_markdown(results: Iterable[dict[str, Any]], paper: bool = False) -> str:
    """Markdown table shaped like Table 2 (one line per row key, see ``row_key``); ``paper``:
    the paper's eight rows beside ours (``table2.paper_section``)."""
    rows: dict[tuple[Any, ...], dict[str, str]] = {}
    labels: dict[tuple[Any, ...], str] = {}
    owner: dict[tuple[tuple[Any, ...], str], str] = {}
    for i, r in enumerate(results):
        r = check_result(r, r.get("_file", f"result {i}") if isinstance(r, dict) else f"result {i}")
        key, col = row_key(r), table_column(r)
        where = r.get("_file") or r.get("outputs", {}).get("json") or f"result {i}"
        if (key, col) in owner:
            raise TableError(f"{owner[key, col]} and {where} both give '{col}' of row "
                             f"{_label(r)!r}; keep one (or give them different --name)")
        owner[key, col] = where
        row = rows.setdefault(key, {c: DASH for c in TABLE_COLUMNS})
        labels[key] = _label(r)
        if r.get("gflops") is not None:
            row["GFLOPs"] = f"{r['gflops']:.1f}"
        row[col] = _fmt(headline(r))
    # same label, different checkpoints: tell them apart
    seen: dict[str, int] = {}
    for key in rows:
        seen[labels[key]] = seen.get(labels[key], 0) + 1
    for key, row in rows.items():
        row["Model"] = labels[key] + (f" ({key[2]})" if seen[labels[key]] > 1 else "")
    # paper-column rows first, then the labelled ones
    order = sorted(rows, key=lambda k: (k[5] != "", list(rows).index(k)))
    if paper:
        from .table2 import paper_section

        order = paper_section(order, rows, TABLE_COLUMNS, DASH, DEFAULT_IMG_SIZE)
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |",
             "|" + "|".join("---" if c == "Model" else "---:" for c in TABLE_COLUMNS) + "|"]
    lines += ["| " + " | ".join(rows[k][c] for c in TABLE_COLUMNS) + " |" for k in order]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- files
def run_tag(result: dict[str, Any]) -> str:
    """File stem of a result, e.g. ``b_t_lvis_point3`` or ``b_t_keep0.5_lvis_box_multimask``:
    everything that makes a different row makes a different file."""
    proto = result["protocol"]
    parts = [result["model"]]
    keep = result.get("keep_ratio")
    if keep is not None and abs(keep - DEFAULT_KEEP) > 1e-9:
        parts.append(f"keep{keep:g}")
    if result["img_size"] != DEFAULT_IMG_SIZE:
        parts.append(f"{result['img_size']}px")
    parts += [result["dataset_kind"], proto["name"]]
    if proto.get("points", "random") != "random":
        parts.append(proto["points"])
    if proto["prompt"] != "point" and proto["multimask"]:
        parts.append("multimask")
    if proto["selection"] == "oracle":
        parts.append("oracle")
    if proto.get("correction_clicks"):
        parts.append(f"{proto['correction_clicks']}clicks")
    if result.get("limit") is not None:
        parts.append(f"limit{result['limit']}")
    if result.get("images", {}).get("exif_orientation", "ignore") != "ignore":
        parts.append("exif")
    if result.get("amp") not in (None, "fp32"):
        parts.append(str(result["amp"]))
    return "_".join(parts)


def write_outputs(result: dict[str, Any], output_dir: str) -> dict[str, str]:
    """``<tag>.json`` and ``<tag>.md`` in ``output_dir``; returns their paths."""
    os.makedirs(output_dir, exist_ok=True)
    tag = run_tag(result)
    jpath = os.path.join(output_dir, tag + ".json")
    mpath = os.path.join(output_dir, tag + ".md")
    write_json_atomic(result, jpath, indent=2)
    write_text_atomic(mpath, table_markdown([result]))
    return {"json": jpath, "markdown": mpath}


def write_predictions(items: list[dict[str, Any]], path: str) -> str:
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


def predictions_path(path: str, tag: str, several: bool) -> str:
    """``--save-predictions`` path of one result: as given for a one-result run, else with the
    result's tag before the suffix (``preds.jsonl`` -> ``preds.b_t_lvis_point1.jsonl``)."""
    if not several:
        return path
    stem, ext = os.path.splitext(path)
    return f"{stem}.{tag}{ext}"


# --------------------------------------------------------------------------- keep-ratio curve
def _metric_name(result: dict[str, Any]) -> str:
    return "AP" if result["protocol"]["prompt"] == "detector" else "mIoU x100"


def curve_record(results: Sequence[dict[str, Any]], references: Sequence[dict[str, Any]]
                 ) -> dict[str, Any]:
    """The curve as data: one point per (protocol, keep ratio), references as extra points."""
    def point(r: dict[str, Any]) -> dict[str, Any]:
        return {"name": r["name"], "model": r["model"], "keep_ratio": r.get("keep_ratio"),
                "protocol": r["protocol"]["name"], "dataset": r["dataset_kind"],
                "metric": _metric_name(r), "value": headline(r), "gflops": r.get("gflops"),
                "encoder_ms_per_image": _ms(r), "file": r.get("outputs", {}).get("json")
                or r.get("_file")}

    lines = sorted({(r["protocol"]["name"], r["dataset_kind"]) for r in results})
    refs = []
    for ref in references:
        if (ref["protocol"]["name"], ref["dataset_kind"]) not in lines:
            raise TableError(f"{ref.get('_file')}: reference is {ref['protocol']['name']} on "
                             f"{ref['dataset_kind']}, but the curve has {lines}")
        refs.append(point(ref))
    return {"kind": CURVE_KIND, "format": FORMAT, "points": [point(r) for r in results],
            "references": refs}


def _ms(r: dict[str, Any]) -> float | None:
    s = r.get("timing", {}).get("encoder_s_per_image")
    return None if s is None else 1000.0 * s


def write_curve(record: dict[str, Any], stem: str) -> dict[str, str]:
    """``<stem>.json`` and ``<stem>.png``: quality against GFLOPs (left) and measured encoder
    latency per image (right), one line per protocol, references as stars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    write_json_atomic(record, stem + ".json", indent=2)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    lines = sorted({(p["protocol"], p["dataset"], p["metric"]) for p in record["points"]})
    for ax, xkey, xlabel in ((axes[0], "gflops", "GFLOPs (paper convention)"),
                             (axes[1], "encoder_ms_per_image", "encoder latency per image (ms)")):
        for proto, ds, metric in lines:
            pts = sorted((p for p in record["points"] if (p["protocol"], p["dataset"]) ==
                          (proto, ds) and p[xkey] is not None and p["value"] is not None),
                         key=lambda p: p["keep_ratio"] or 0)
            if not pts:
                continue
            line, = ax.plot([p[xkey] for p in pts], [p["value"] for p in pts], "o-",
                            label=f"{pts[0]['name']} {proto} ({ds}, {metric})")
            for p in pts:
                ax.annotate(f"{p['keep_ratio']:g}", (p[xkey], p["value"]), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
            for ref in record["references"]:
                if (ref["protocol"], ref["dataset"]) == (proto, ds) and ref[xkey] is not None:
                    ax.plot(ref[xkey], ref["value"], "*", ms=11, color=line.get_color())
                    ax.annotate(ref["name"], (ref[xkey], ref["value"]), fontsize=7,
                                textcoords="offset points", xytext=(4, -9))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("mIoU x100 / mask AP")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("quality vs cost over keep ratios (labels: keep ratio; stars: references)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(stem + ".png", dpi=120)
    plt.close(fig)
    return {"json": stem + ".json", "png": stem + ".png"}
