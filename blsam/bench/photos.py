"""Whole-SAM rows on real photos: ``SamPredictor.set_image`` per aspect ratio (with the
P-block queries spent on padding) and what a user waits for end to end (a click, the automatic
mask generator), official SAM beside bLViT with and without ``skip_padding``."""
from __future__ import annotations

import statistics

from blsam.specs import FAMILIES

from .config import BenchConfig, default_devices
from .results import Result, relative_to, summarise
from .schedule import drop_with_warning, interleaved, started, warm_up


def sam_variants(cfg: BenchConfig) -> list[dict[str, object]]:
    """The whole-SAM rows of the photo and end-to-end sections, as jobs: the first family's
    official SAM, then its bLViT at every keep ratio without and with ``skip_padding``."""
    vanilla, student = FAMILIES[cfg.families[0]]
    dev = "cuda" if "cuda" in (cfg.devices or default_devices()) else "cpu"  # where users are
    variants = [{"kind": "sam", "name": vanilla, "model": "official", "keep_ratio": None,
                 "skip_padding": False, "device": dev}]
    for r in cfg.keep_ratios:
        for skip in (False, True):
            variants.append({"kind": "sam", "name": f"{student}@{r:g}" + (
                "+skip_padding" if skip else ""), "model": "blsam", "keep_ratio": r,
                "skip_padding": skip, "device": dev})
    return variants


def photo_rows(cfg: BenchConfig, malloc: str) -> list[Result]:
    """``SamPredictor.set_image`` on real photos of several aspect ratios: official SAM vs
    bLViT with the paper's routing and with ``skip_padding``, rounds interleaved; counts
    P-block queries on padding."""
    handles = started(cfg, sam_variants(cfg), malloc)
    rows: list[Result] = []
    try:
        for aspect in cfg.photos:
            warm_up(handles, "set_image", aspect, cfg.warmup)
            times: dict[str, list[float]] = {h.job["name"]: [] for h in handles}
            last: dict[str, dict[str, object]] = {}

            def set_image(h, aspect: str = aspect, last=last, times=times) -> None:
                out = last[h.job["name"]] = h.call("set_image", aspect)
                times[h.job["name"]].append(out["ms"])

            interleaved(list(handles), cfg.repeats, set_image, drop_with_warning(handles))
            for h in handles:
                job, out, t = h.job, last[h.job["name"]], times[h.job["name"]]
                res = Result(job["name"], cfg.families[0], job["model"], job["keep_ratio"],
                             job["device"], "fp32", 1, float("nan"), out["gflops_full_encoder"],
                             skip_padding=job["skip_padding"], photo=out["photo"], malloc=malloc)
                summarise(res, t, 1)
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
            r.ratio_latency_vs_official = relative_to(r, off[r.photo])
    return rows


def e2e_rows(cfg: BenchConfig, malloc: str) -> list[dict[str, object]]:
    """What a SAM user waits for, on real photos: ``SamPredictor.set_image`` + ``predict``
    (one click, 3 masks) and ``SamAutomaticMaskGenerator.generate`` with its defaults, for the
    official encoder and bLViT at every keep ratio with and without ``skip_padding``. Each
    model in its own worker (``--isolation``); rounds interleaved across models."""
    handles = started(cfg, sam_variants(cfg), malloc)
    rows: list[dict[str, object]] = []
    try:
        for aspect in cfg.e2e_photos:
            rec = {h.job["name"]: {"set_image": [], "predict": [], "amg": [], "amg_encoder": [],
                                   "masks": []} for h in handles}
            photo_name = ""
            warm_up(handles, "click", aspect, max(cfg.warmup, 1))

            def click(h, aspect: str = aspect, rec=rec) -> None:
                nonlocal photo_name
                out = h.call("click", aspect)
                photo_name = out["photo"]
                rec[h.job["name"]]["set_image"].append(out["set_image_ms"])
                rec[h.job["name"]]["predict"].append(out["predict_ms"])

            def amg(h, aspect: str = aspect, rec=rec) -> None:
                out = h.call("amg", aspect)
                for k in ("amg", "amg_encoder"):
                    rec[h.job["name"]][k].append(out[f"{k}_ms"])
                rec[h.job["name"]]["masks"].append(out["masks"])

            drop = drop_with_warning(handles)
            interleaved(list(handles), cfg.repeats, click, drop)
            interleaved(list(handles), cfg.e2e_amg_repeats, amg, drop)
            base = None
            for h in handles:
                t = rec[h.job["name"]]
                row = {"model": h.job["name"], "kind": h.job["model"],
                       "keep_ratio": h.job["keep_ratio"], "skip_padding": h.job["skip_padding"],
                       "photo": photo_name, "malloc": malloc, "isolation": cfg.isolation,
                       "device": h.job["device"],
                       "set_image_ms": statistics.median(t["set_image"]),
                       "predict_ms": statistics.median(t["predict"]),
                       "amg_ms": statistics.median(t["amg"]),
                       "amg_encoder_ms": statistics.median(t["amg_encoder"]),
                       "amg_masks": t["masks"][-1], "times_ms": t,
                       "points_per_side": cfg.e2e_points_per_side}
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
