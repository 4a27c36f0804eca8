"""One zero-shot evaluation run, from an ``EvalConfig`` to its result files: data, model,
the (distributed) keep-ratio loop, one ``EvalResult`` per protocol and keep ratio, outputs.

Why apart from the CLI: a library caller (a notebook, a sweep) runs ``evaluate(config)`` and
gets typed results back; ``blsam-eval`` only parses options into an ``EvalConfig``.
"""
from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..specs import BLVIT_MODELS, KEEP_RATIO_MODELS
from ..utils.cli import OptionError
from ..utils.files import file_sha256
from .config import EvalConfig, check_config
from .protocol import ProtocolConfig
from .results import EvalResult, ShardResult

KEEP = KEEP_RATIO_MODELS


@dataclass
class EvalData:
    """Everything read before the model is built."""

    dataset: Any
    detections: dict[int, list[dict[str, Any]]] | None
    found: list[Any]
    missing: list[int]
    bad: list[dict[str, Any]] = field(default_factory=list)
    bad_annotations: list[dict[str, Any]] = field(default_factory=list)
    detection_counts: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalRun:
    """What a run returns on rank 0: its results, the printed table, the curve's files."""

    results: list[EvalResult]
    table: str
    curve: dict[str, str] | None = None

    def to_json(self) -> dict[str, Any]:
        """``{"results": [record, ...], "table", "curve"}``, as ``blsam-eval``'s main gives."""
        return {"results": [r.to_json() for r in self.results], "table": self.table,
                "curve": self.curve}


def sam_gflops(sam: torch.nn.Module) -> float:
    """GFLOPs of SAM with one prompt in the paper's convention (Table 2's column)."""
    from ..flops import count_gflops

    return float(count_gflops(sam, convention="paper"))


def _versions() -> dict[str, str]:
    import numpy

    import blsam

    return {"blsam": blsam.__version__, "torch": torch.__version__, "numpy": numpy.__version__}


def _row_name(config: EvalConfig, names: dict[str, str]) -> str:
    """The paper's model name, flagged when the weights are not the trained ones."""
    name = names.get(config.model, config.model)
    if config.checkpoint is None:
        name += " (SAM init)" if config.sam_checkpoint and config.model in KEEP else \
            (" (random)" if not config.sam_checkpoint else "")
    return name


def build_model(config: EvalConfig) -> torch.nn.Module:
    """The model to evaluate (warns when its weights cannot give meaningful numbers)."""
    import blsam

    if config.checkpoint is None:
        if config.sam_checkpoint is not None and config.model in BLVIT_MODELS:
            warnings.warn(f"{config.model}: no trained checkpoint, E-blocks and predictors are "
                          f"untrained (P-blocks from {config.sam_checkpoint}): results are not "
                          f"meaningful", UserWarning, stacklevel=2)
        elif config.sam_checkpoint is None:
            warnings.warn(f"{config.model}: no checkpoint, evaluating random weights: results "
                          f"are not meaningful", UserWarning, stacklevel=2)
    return blsam.build_model(config.model, config.checkpoint, config.sam_checkpoint,
                             config.keep_ratio, config.img_size)


# --------------------------------------------------------------------------- data
def load_data(config: EvalConfig, protos: Sequence[ProtocolConfig]) -> EvalData:
    """Annotation file, detections and image files, all checked (``DatasetError``)."""
    from .datasets import (
        DatasetError,
        check_lvis_eval_fields,
        find_bad_annotations,
        load_dataset,
        load_detections,
    )
    from .runner import locate_images

    dataset = load_dataset(config.ann_file, config.dataset)
    images = list(enumerate(dataset.images))[: config.limit]
    # every object of the file was checked; those of the evaluated images (and those of no
    # image) that are wrong refuse the run, or are skipped and counted
    bad_anns = find_bad_annotations(dataset, [im["id"] for _, im in images])
    if bad_anns and not config.skip_bad_images:
        b = bad_anns[0]
        raise DatasetError(f"{config.ann_file!r}: {len(bad_anns)} annotation(s) cannot be "
                           f"evaluated as drawn, e.g. annotation {b['id']} (image "
                           f"{b['image_id']}): {b['detail']} ({b['reason']}); pass "
                           f"--skip-bad-images to skip and count them")
    detections = None
    det_counts: dict[str, Any] = {}
    det = next((c for c in protos if c.prompt == "detector"), None)
    if det is not None:
        if dataset.kind == "lvis":
            check_lvis_eval_fields(dataset.raw, config.ann_file)
        detections = load_detections(config.det_file, dataset, det.max_dets, det_counts)
    if detections is not None and not any(detections.get(im["id"]) for _, im in images):
        warnings.warn(f"{config.det_file}: no detection for any of the {len(images)} evaluated "
                      f"images: AP will be 0", UserWarning, stacklevel=2)
    # every rank checks every image, so a missing file fails all ranks alike
    found, missing, bad = locate_images(config.img_dir, images, config.skip_missing_images,
                                        config.skip_bad_images)
    return EvalData(dataset, detections, found, missing, bad, bad_anns, det_counts)


# --------------------------------------------------------------------------- results
def checkpoint_sha(path: str | None) -> str | None:
    """Which weights produced the numbers: 12 hex digits of the file's sha256, None without
    one (random weights)."""
    return file_sha256(path, 12) if path and os.path.isfile(path) else None


def make_result(config: EvalConfig, cfg: ProtocolConfig, protos: Sequence[ProtocolConfig],
                merged: ShardResult, data: EvalData, keep: float | None,
                gflops: float | None, wall: float, world_size: int, device: str,
                ckpt_sha256: str | None = None) -> EvalResult:
    """The record of one protocol at one keep ratio (``ckpt_sha256``: the checkpoint's hash,
    computed once per run by the caller; hashed here when not given)."""
    from ..specs import DISPLAY_NAMES
    from .runner import compute_metrics

    part = merged.protocols[cfg.name]
    c = merged.counts
    ckpt = config.checkpoint or config.sam_checkpoint
    enc_s = sum(merged.encoder_s_per_rank)
    gt = cfg.prompt != "detector"
    return EvalResult(
        name=config.name or _row_name(config, DISPLAY_NAMES),
        model=config.model, checkpoint=ckpt,
        checkpoint_sha256=ckpt_sha256 if ckpt_sha256 is not None else checkpoint_sha(ckpt),
        keep_ratio=keep, img_size=config.img_size, amp=config.amp,
        dataset_kind=data.dataset.kind, ann_file=config.ann_file, limit=config.limit,
        protocol=cfg.describe(),
        run={"protocols": [p.name for p in protos], "keep_ratios": config.keep_ratios,
             "shared_encoder_pass": len(protos) > 1},
        config=config.record(), versions=_versions(),
        counts={
            "images": len(merged.evaluated_image_ids),
            "annotations_evaluated": len(part.records),
            "detections_evaluated": len(part.results),
            "skipped_crowd": c.skipped_crowd, "skipped_empty": c.skipped_empty,
            "bad_annotations": c.bad_annotations + part.bad_annotations if gt else 0,
            "exif_rotated_images": c.exif_rotated_images,
            "missing_images": len(merged.missing_images),
            "bad_images": len(merged.bad_images),
            "images_encoded": c.images_encoded, "images_not_encoded": c.images_not_encoded,
        },
        skipped_images={"missing": merged.missing_images, "bad": merged.bad_images},
        skipped_annotations=data.bad_annotations if gt else [],
        annotation_check=data.dataset.annotation_counts.as_dict(),
        detection_counts=data.detection_counts if not gt else {},
        images={"exif_orientation": config.exif_orientation,
                "reader": "PIL (blsam.utils.images.decode_rgb)"},
        metrics=compute_metrics(merged, data.dataset, cfg),
        gflops=gflops, gflops_convention="paper",
        timing={"world_size": world_size, "device": device,
                "dist_timeout_min": config.dist_timeout,
                "wall_s": wall,  # of the whole pass, shared by its protocols
                "encoder_s_per_image": enc_s / c.images_encoded if c.images_encoded else None,
                "decode_s": part.decode_s})


def write_results(config: EvalConfig, results: list[EvalResult],
                  merged_by_keep: dict[float | None, ShardResult],
                  refs: list[dict[str, Any]]) -> EvalRun:
    """JSON + Markdown per result, predictions, the keep-ratio curve; prints the table."""
    from .report import (
        curve_record,
        predictions_path,
        run_tag,
        table_markdown,
        write_curve,
        write_outputs,
        write_predictions,
    )

    for r in results:
        if config.save_predictions:
            part = merged_by_keep[r.keep_ratio].protocols[r.tag]
            r.predictions_file = write_predictions(
                part.saved_items(r.protocol["prompt"]),
                predictions_path(config.save_predictions, run_tag(r.to_json()), len(results) > 1))
        r.outputs = write_outputs(r.to_json(), config.output)
    records = [r.to_json() for r in results]
    curve = None
    if config.keep_ratios is not None:
        size = "" if config.img_size == 1024 else f"_{config.img_size}px"
        stem = os.path.join(config.output, f"{config.model}{size}_{results[0].dataset_kind}"
                                           f"_keep_curve")
        curve = write_curve(curve_record(records, refs), stem)
    table = table_markdown(records)
    print(table, end="")
    for r in results:
        print(f"wrote {r.outputs['json']}")
    if curve:
        print(f"wrote {curve['png']}")
    return EvalRun(results, table, curve)


def table_of(paths: Sequence[str], paper: bool = False) -> dict[str, Any]:
    """``--table``: merge result files into one Markdown table (curve files are skipped)."""
    from .report import load_results, table_markdown

    results, skipped = load_results(paths)
    for s in skipped:
        print(f"note: {s} is a keep-ratio curve, not a table row; skipped", file=sys.stderr)
    text = table_markdown(results, paper=paper)
    print(text, end="")
    return {"table": text, "results": results}


def load_references(config: EvalConfig, protos: Sequence[ProtocolConfig]
                    ) -> list[dict[str, Any]]:
    """``--reference`` records, each checked now against the run's protocols (not after the
    evaluation)."""
    if not config.reference:
        return []
    from .report import load_results

    refs = load_results(config.reference)[0]
    lines = {(c.name, config.dataset) for c in protos}
    for ref in refs:
        if (ref["protocol"]["name"], ref["dataset_kind"]) not in lines:
            raise OptionError(f"--reference {ref['_file']}: {ref['protocol']['name']} on "
                              f"{ref['dataset_kind']} is none of this run's protocols "
                              f"{sorted(lines)}")
    return refs


# --------------------------------------------------------------------------- the run
def evaluate(config: EvalConfig) -> EvalRun | None:
    """Evaluate every protocol (at every keep ratio) of ``config`` after checking it
    (``OptionError``); the run on rank 0, None on the other ranks of a torchrun job."""
    protos = check_config(config)
    refs = load_references(config, protos)

    from ..utils.dist import cleanup, init_distributed

    info = init_distributed(config.device, timeout_min=config.dist_timeout)
    try:
        out = _evaluate(config, protos, refs, info)
    except Exception as e:
        if not getattr(e, "all_ranks", False):  # else cli prints it on every rank, then cleans up
            cleanup()
        raise
    cleanup()
    return out


def _evaluate(config: EvalConfig, protos: Sequence[ProtocolConfig],
              refs: list[dict[str, Any]], info: Any) -> EvalRun | None:
    """Load, build, evaluate at every keep ratio (each rank's shard gathered to rank 0 only),
    then, once every rank has finished every keep ratio, metrics and files on rank 0 alone: no
    rank waits in a collective while rank 0 runs COCOeval / LVISEval."""
    from ..utils.collectives import check_peers, fail_together, gather_to_main
    from .runner import Evaluator, Predictor

    log_dir = config.output
    with fail_together(log_dir):
        data = load_data(config, protos)
    with fail_together(log_dir):
        sam = build_model(config).to(info.device).eval()
    keeps: list[float | None] = (list(config.keep_ratios) if config.keep_ratios else
                                    [config.keep_ratio]) if config.routed else [None]
    gflops: dict[float | None, float | None] = {}
    for keep in keeps:  # before evaluating: inference-mode caches break the counter's trace
        if keep is not None:
            sam.image_encoder.keep_ratio = keep
        gflops[keep] = None if config.no_flops or not info.is_main else sam_gflops(sam)
    evaluator = Evaluator(Predictor(sam), data.dataset, config.img_dir, protos,
                          data.detections, config.skip_bad_images, config.exif_orientation)
    shard = data.found[info.rank::info.world_size]
    merged_by_keep: dict[float | None, ShardResult] = {}
    walls: dict[float | None, float] = {}
    for keep in keeps:
        if keep is not None:
            sam.image_encoder.keep_ratio = keep
        t0 = time.perf_counter()
        with fail_together(log_dir), torch.inference_mode(), torch.autocast(
                info.device.type, dtype=torch.bfloat16, enabled=config.amp == "bf16"):
            part = evaluator.run(shard, data.missing if info.is_main else [],
                                 progress=info.is_main and not config.no_progress,
                                 bad=data.bad if info.is_main else [], should_stop=check_peers)
        shards = gather_to_main(part)  # rank 0 only: detections are not copied to every rank
        del part
        walls[keep] = time.perf_counter() - t0
        if info.is_main:
            merged_by_keep[keep] = ShardResult.merge(shards)
        del shards
    if not info.is_main:  # nothing left for this rank: no collective waits on rank 0's metrics
        return None
    ckpt_sha = checkpoint_sha(config.checkpoint or config.sam_checkpoint)  # once per run
    results = [make_result(config, cfg, protos, merged_by_keep[keep], data, keep, gflops[keep],
                           walls[keep], info.world_size, str(info.device), ckpt_sha)
               for keep in keeps for cfg in protos]
    return write_results(config, results, merged_by_keep, refs)
