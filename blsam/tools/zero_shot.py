"""Zero-shot evaluation of bLViT-SAM / SAM (paper §4.4, Table 2).

Point (1 or 3 clicks inside each GT mask) and box (GT box) prompts report mIoU on LVIS; detector
boxes (e.g. ViTDet) report mask AP with COCOeval / LVISEval. Several protocols in one run share
one encoder pass per image; --keep-ratios evaluates one bLViT checkpoint at several keep ratios::

    python eval/zero_shot.py --model b_t --checkpoint blsam_b_t.pth --dataset lvis \\
        --ann-file lvis_v1_val.json --img-dir coco/ --prompt point1 point3 box --output out/
    python eval/zero_shot.py ... --keep-ratios 0.1 0.25 0.5 0.75 1.0 --reference out/vit_b_*.json
    torchrun --nproc_per_node 8 eval/zero_shot.py ...   # images sharded, rank 0 merges
    python eval/zero_shot.py --table out/*.json         # merge rows into Table 2

See docs/evaluation.md.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence


import torch

from blsam.evaluation.protocol import POINT_MODES, ProtocolConfig
from blsam.utils.cli import (
    one_line_parse_errors,
    run_cli,
    HelpFormatter,
    OptionError,
    add_model_args,
    check_model_args,
    check_option,
)
from blsam.utils.collectives import DEFAULT_TIMEOUT_MIN
from blsam.utils.images import EXIF_MODES
from blsam.utils.config import parse_args_with_config
from blsam.specs import BLVIT_MODELS, KEEP_RATIO_MODELS, MODEL_SPECS, check_keep_ratio

MODELS = tuple(MODEL_SPECS)
BLVIT = BLVIT_MODELS
KEEP = KEEP_RATIO_MODELS  # bLViT and the token-pruning baselines
PROMPT_RE = re.compile(r"point(\d*)|box|detector")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--config", default=None, help="YAML file of option defaults")
    add_model_args(p, choices=MODELS)
    p.add_argument("--keep-ratios", nargs="+", type=float, default=None, metavar="R",
                   help="b_t/h_b: evaluate at each keep ratio in one run (overrides "
                        "--keep-ratio); writes one row per ratio and a quality-vs-cost curve")
    p.add_argument("--reference", nargs="+", default=None, metavar="JSON",
                   help="with --keep-ratios: result JSONs (e.g. vit_* runs) drawn as reference "
                        "points on the curve")
    p.add_argument("--name", default=None, help="row name in the table (default: paper's name)")
    d = p.add_argument_group("data")
    d.add_argument("--dataset", choices=("coco", "lvis"), default="lvis",
                   help="kind of --ann-file (checked against the file)")
    d.add_argument("--ann-file", default=None, help="COCO instances / LVIS v1 json (required)")
    d.add_argument("--img-dir", default=None,
                   help="folder with the images, directly or in train2017/ and val2017/ "
                        "(required)")
    d.add_argument("--det-file", default=None,
                   help="detector results (COCO results format) for --prompt detector")
    d.add_argument("--limit", type=int, default=None,
                   help="evaluate the first N images (by id); such rows are labelled in --table")
    d.add_argument("--skip-missing-images", action="store_true",
                   help="skip (and count) images that are not in --img-dir instead of failing")
    d.add_argument("--skip-bad-images", action="store_true",
                   help="skip (and count) truncated, undecodable or wrong-size images, and "
                        "annotations with a degenerate polygon or (box prompt) a zero-size "
                        "bbox, instead of failing")
    d.add_argument("--exif-orientation", choices=EXIF_MODES, default="ignore",
                   help="ignore: score the stored pixels, as COCO/LVIS/SA-1B annotations and "
                        "the reference evaluations read them; apply: rotate by the EXIF tag "
                        "first (recorded in the results)")
    q = p.add_argument_group("protocol")
    q.add_argument("--prompt", nargs="+", default=["point"], metavar="PROMPT",
                   help="one or more of point (--num-points clicks), point<k> (point1, point3, "
                        "...), box, detector; all share one encoder pass per image")
    q.add_argument("--num-points", type=int, default=1, help="clicks per object for 'point'")
    q.add_argument("--point-from", choices=POINT_MODES, default="random",
                   help="random: uniform inside the mask (paper); nested: uniform, the 1-point "
                        "click is the first of the 3; center: first click farthest from the "
                        "boundary; iterative: SAM's center click then error-region clicks, "
                        "multimask at each step")
    q.add_argument("--oracle", action="store_true",
                   help="multimask protocols: keep the output with the best IoU to GT")
    q.add_argument("--box-multimask", action="store_true",
                   help="box and detector prompts: 3 masks, keep the best predicted IoU "
                        "(EfficientViT-SAM's eval) instead of single-mask output")
    q.add_argument("--num-clicks", type=int, default=0,
                   help="extra correction clicks with mask feedback (point/box protocols)")
    q.add_argument("--max-dets", type=int, default=None,
                   help="detections per image, best scores first, the rest never decoded "
                        "(default: 300 on LVIS, 100 on COCO: the evaluators' caps)")
    q.add_argument("--seed", type=int, default=0, help="point sampling seed")
    o = p.add_argument_group("run and output")
    o.add_argument("--batch-prompts", type=int, default=64, help="prompts per decoder batch")
    o.add_argument("--save-predictions", default=None,
                   help="write every mask (COCO RLE) with its prompt: .jsonl or .json; with "
                        "several results the result's tag goes before the suffix")
    o.add_argument("--output", default="outputs/eval", help="folder for the JSON and .md files")
    o.add_argument("--no-flops", action="store_true", help="do not count GFLOPs")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    o.add_argument("--amp", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: encoder and decoder under bf16 autocast (GPU throughput; "
                        "recorded, and labelled in --table); fp32: the papers' numbers")
    o.add_argument("--dist-timeout", type=float, default=DEFAULT_TIMEOUT_MIN, metavar="MIN",
                   help="torchrun: process-group timeout in minutes, as in blsam-train "
                        "(NCCL's watchdog default is 10; recorded in the results)")
    o.add_argument("--table", nargs="+", default=None, metavar="JSON",
                   help="only merge result JSON files into one Table 2 and print it")
    return p


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    return parse_args_with_config(one_line_parse_errors(build_parser()), argv)


def sam_gflops(sam: torch.nn.Module) -> float:
    """GFLOPs of SAM with one prompt in the paper's convention (Table 2's column)."""
    from blsam.flops import count_gflops

    return float(count_gflops(sam, convention="paper"))


def _versions() -> Dict[str, str]:
    import numpy

    import blsam

    return {"blsam": blsam.__version__, "torch": torch.__version__, "numpy": numpy.__version__}


def _row_name(args: argparse.Namespace, names: Dict[str, str]) -> str:
    """The paper's model name, flagged when the weights are not the trained ones."""
    name = names.get(args.model, args.model)
    if args.checkpoint is None:
        name += " (SAM init)" if args.sam_checkpoint and args.model in KEEP else \
            (" (random)" if not args.sam_checkpoint else "")
    return name


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    import blsam

    if args.checkpoint is None:
        if args.sam_checkpoint is not None and args.model in BLVIT:
            warnings.warn(f"{args.model}: no trained checkpoint, E-blocks and predictors are "
                          f"untrained (P-blocks from {args.sam_checkpoint}): results are not "
                          f"meaningful", UserWarning)
        elif args.sam_checkpoint is None:
            warnings.warn(f"{args.model}: no checkpoint, evaluating random weights: results are "
                          f"not meaningful", UserWarning)
    return blsam.build_model(args.model, args.checkpoint, args.sam_checkpoint, args.keep_ratio,
                             args.img_size)


# --------------------------------------------------------------------------- option checks
def protocols_from_args(args: argparse.Namespace) -> List[ProtocolConfig]:
    """The run's protocols; each switch goes to the protocols it means something for, and a
    switch that means nothing for all of them is an ``OptionError``."""
    names = [args.prompt] if isinstance(args.prompt, str) else list(args.prompt)
    max_dets = args.max_dets if args.max_dets is not None else (  # the evaluators' caps
        300 if args.dataset == "lvis" else 100)
    protos = []
    for name in names:
        m = PROMPT_RE.fullmatch(str(name))
        if m is None:
            raise OptionError(f"--prompt {name!r}: use point, point<k> (point1, point3, ...), "
                              f"box or detector")
        kind = "point" if str(name).startswith("point") else str(name)
        k = int(m.group(1)) if m.group(1) else args.num_points
        if kind == "point" and k < 1:
            raise OptionError(f"--prompt {name}: the number of points must be >= 1")
        cfg = ProtocolConfig(
            prompt=kind, num_points=k, point_from=args.point_from,
            num_clicks=args.num_clicks if kind != "detector" else 0,
            box_multimask=args.box_multimask and kind != "point", seed=args.seed,
            batch_prompts=args.batch_prompts, max_dets=max_dets,
            skip_missing_images=args.skip_missing_images,
            save_predictions=bool(args.save_predictions))
        cfg.oracle = args.oracle and cfg.multimask and kind != "detector"
        protos.append(cfg)
    seen = [c.name for c in protos]
    if len(set(seen)) != len(seen):
        raise OptionError(f"--prompt {' '.join(map(str, names))}: a protocol is listed twice "
                          f"({seen})")
    kinds = {c.prompt for c in protos}
    if args.point_from != "random" and "point" not in kinds:
        raise OptionError(f"--point-from {args.point_from} needs a point prompt")
    if args.box_multimask and not kinds & {"box", "detector"}:
        raise OptionError("--box-multimask needs a box or detector prompt")
    if args.num_clicks and not kinds & {"point", "box"}:
        raise OptionError("--num-clicks needs GT masks: use it with point or box prompts")
    if args.oracle and not any(c.oracle for c in protos):
        raise OptionError("--oracle picks one of 3 masks, but no protocol of this run is "
                          "multimask (1 point, --point-from iterative or --box-multimask)")
    for c in protos:
        try:
            c.validate()
        except ValueError as e:
            raise OptionError(str(e)) from e
    return protos


def _check_writable_dir(path: str, opt: str) -> None:
    """Create ``path`` and write a file in it now, not after hours of evaluation."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise OptionError(f"{opt} {path!r} is a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_test_"):
            pass
    except OSError as e:
        raise OptionError(f"{opt} {path!r} is not writable: {e.strerror or e}") from e


def check_args(args: argparse.Namespace) -> List[ProtocolConfig]:
    """Every option checked before any file is loaded or model built; returns the protocols."""
    for opt in ("ann_file", "img_dir"):
        if not getattr(args, opt):
            raise OptionError(f"--{opt.replace('_', '-')} is required")
    if not os.path.isdir(args.img_dir):
        raise OptionError(f"--img-dir {args.img_dir!r} is not a folder")
    for opt in ("num_points", "batch_prompts", "limit", "max_dets"):
        v = getattr(args, opt)
        if v is not None and v < 1:
            raise OptionError(f"--{opt.replace('_', '-')} must be >= 1, got {v}")
    if args.num_clicks < 0:
        raise OptionError(f"--num-clicks must be >= 0, got {args.num_clicks}")
    if not args.dist_timeout > 0:
        raise OptionError(f"--dist-timeout must be > 0 minutes, got {args.dist_timeout}")
    check_model_args(args)
    protos = protocols_from_args(args)
    if any(c.prompt == "detector" for c in protos):
        if not args.det_file:
            raise OptionError("--prompt detector needs --det-file (COCO-format detections)")
        if not os.path.isfile(args.det_file):
            raise OptionError(f"--det-file {args.det_file!r}: no such file")
    if args.keep_ratios is not None:
        if args.model not in KEEP:
            raise OptionError(f"--keep-ratios: {args.model} has no token routing "
                              f"({', '.join(KEEP)})")
        for r in args.keep_ratios:
            check_option(check_keep_ratio, r, "--keep-ratios")
        if len(set(args.keep_ratios)) != len(args.keep_ratios):
            raise OptionError(f"--keep-ratios lists a ratio twice: {args.keep_ratios}")
    if args.reference and args.keep_ratios is None:
        raise OptionError("--reference draws points on the --keep-ratios curve; give "
                          "--keep-ratios")
    _check_writable_dir(args.output, "--output")
    if args.save_predictions:
        if os.path.isdir(args.save_predictions):
            raise OptionError(f"--save-predictions {args.save_predictions!r} is a folder; give "
                              f"a file name (.jsonl or .json)")
        _check_writable_dir(os.path.dirname(os.path.abspath(args.save_predictions)),
                            "--save-predictions folder")
    return protos


# --------------------------------------------------------------------------- data
@dataclass
class EvalData:
    """Everything read before the model is built."""

    dataset: Any
    detections: Optional[Dict[int, List[Dict[str, Any]]]]
    found: List[Any]
    missing: List[int]
    bad: List[Dict[str, Any]] = field(default_factory=list)
    bad_annotations: List[Dict[str, Any]] = field(default_factory=list)
    detection_counts: Dict[str, Any] = field(default_factory=dict)


def load_data(args: argparse.Namespace, protos: Sequence[ProtocolConfig]) -> EvalData:
    """Annotation file, detections and image files, all checked (``DatasetError``)."""
    from blsam.evaluation.datasets import (
        DatasetError,
        check_lvis_eval_fields,
        find_bad_annotations,
        load_dataset,
        load_detections,
    )
    from blsam.evaluation.runner import locate_images

    dataset = load_dataset(args.ann_file, args.dataset)
    images = list(enumerate(dataset.images))[: args.limit]
    # every object of the file was checked; those of the evaluated images (and those of no
    # image) that are wrong refuse the run, or are skipped and counted
    bad_anns = find_bad_annotations(dataset, [im["id"] for _, im in images])
    if bad_anns and not args.skip_bad_images:
        b = bad_anns[0]
        raise DatasetError(f"{args.ann_file!r}: {len(bad_anns)} annotation(s) cannot be "
                           f"evaluated as drawn, e.g. annotation {b['id']} (image "
                           f"{b['image_id']}): {b['detail']} ({b['reason']}); pass "
                           f"--skip-bad-images to skip and count them")
    detections = None
    det_counts: Dict[str, Any] = {}
    det = next((c for c in protos if c.prompt == "detector"), None)
    if det is not None:
        if dataset.kind == "lvis":
            check_lvis_eval_fields(dataset.raw, args.ann_file)
        detections = load_detections(args.det_file, dataset, det.max_dets, det_counts)
    if detections is not None and not any(detections.get(im["id"]) for _, im in images):
        warnings.warn(f"{args.det_file}: no detection for any of the {len(images)} evaluated "
                      f"images: AP will be 0", UserWarning)
    # every rank checks every image, so a missing file fails all ranks alike
    found, missing, bad = locate_images(args.img_dir, images, args.skip_missing_images,
                                        args.skip_bad_images)
    return EvalData(dataset, detections, found, missing, bad, bad_anns, det_counts)


# --------------------------------------------------------------------------- results
def make_result(args: argparse.Namespace, cfg: ProtocolConfig, protos: Sequence[ProtocolConfig],
                merged: Dict[str, Any], data: EvalData, keep: Optional[float],
                gflops: Optional[float], wall: float, world_size: int, device: str,
                ckpt_sha256: Optional[str] = None) -> Dict[str, Any]:
    """The JSON record of one protocol at one keep ratio (``ckpt_sha256``: the checkpoint's
    hash, computed once per run by the caller; hashed here when not given)."""
    from blsam.evaluation.report import FORMAT, RESULT_KIND, file_sha256
    from blsam.specs import DISPLAY_NAMES
    from blsam.evaluation.runner import compute_metrics

    part = merged["protocols"][cfg.name]
    c = merged["counts"]
    ckpt = args.checkpoint or args.sam_checkpoint
    enc_s = sum(merged["encoder_s_per_rank"])
    return {
        "kind": RESULT_KIND, "format": FORMAT,
        "name": args.name or _row_name(args, DISPLAY_NAMES),
        "model": args.model, "checkpoint": ckpt,
        "checkpoint_sha256": ckpt_sha256 if ckpt_sha256 is not None else file_sha256(ckpt),
        "keep_ratio": keep, "img_size": args.img_size, "amp": getattr(args, "amp", "fp32"),
        "dataset_kind": data.dataset.kind, "ann_file": args.ann_file, "limit": args.limit,
        "protocol": cfg.describe(),
        "run": {"protocols": [p.name for p in protos], "keep_ratios": args.keep_ratios,
                "shared_encoder_pass": len(protos) > 1},
        "config": {k: v for k, v in vars(args).items() if k != "table"},
        "versions": _versions(),
        "counts": {
            "images": len(merged["evaluated_image_ids"]),
            "annotations_evaluated": len(part["records"]),
            "detections_evaluated": len(part["results"]),
            "skipped_crowd": c["skipped_crowd"], "skipped_empty": c["skipped_empty"],
            "bad_annotations": (c.get("bad_annotations", 0) + part.get("bad_annotations", 0)
                                if cfg.prompt != "detector" else 0),
            "exif_rotated_images": c.get("exif_rotated_images", 0),
            "missing_images": len(merged["missing_images"]),
            "bad_images": len(merged["bad_images"]),
            "images_encoded": c["images_encoded"], "images_not_encoded": c["images_not_encoded"],
        },
        "skipped_images": {"missing": merged["missing_images"], "bad": merged["bad_images"]},
        "skipped_annotations": data.bad_annotations if cfg.prompt != "detector" else [],
        "annotation_check": data.dataset.annotation_counts.as_dict(),
        "detection_counts": data.detection_counts if cfg.prompt == "detector" else {},
        "images": {"exif_orientation": getattr(args, "exif_orientation", "ignore"),
                   "reader": "PIL (blsam.utils.images.decode_rgb)"},
        "metrics": compute_metrics(merged, data.dataset, cfg),
        "gflops": gflops, "gflops_convention": "paper",
        "timing": {"world_size": world_size, "device": device,
                   "dist_timeout_min": getattr(args, "dist_timeout", None),
                   "wall_s": wall,  # of the whole pass, shared by its protocols
                   "encoder_s_per_image": enc_s / c["images_encoded"] if c["images_encoded"]
                   else None,
                   "decode_s": part["decode_s"]},
    }


def write_results(args: argparse.Namespace, results: List[Dict[str, Any]],
                  merged_by_keep: Dict[Optional[float], Dict[str, Any]],
                  refs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """JSON + Markdown per result, predictions, the keep-ratio curve; prints the table."""
    from blsam.evaluation.report import (
        curve_record,
        predictions_path,
        run_tag,
        table_markdown,
        write_curve,
        write_outputs,
        write_predictions,
    )

    for r in results:
        if args.save_predictions:
            part = merged_by_keep[r["keep_ratio"]]["protocols"][r["protocol"]["name"]]
            items = part["results"] if r["protocol"]["prompt"] == "detector" else \
                part["predictions"]
            r["predictions_file"] = write_predictions(
                items, predictions_path(args.save_predictions, run_tag(r), len(results) > 1))
        r["outputs"] = write_outputs(r, args.output)
    curve = None
    if args.keep_ratios is not None:
        size = "" if args.img_size == 1024 else f"_{args.img_size}px"
        stem = os.path.join(args.output, f"{args.model}{size}_{results[0]['dataset_kind']}"
                                         f"_keep_curve")
        curve = write_curve(curve_record(results, refs), stem)
    table = table_markdown(results)
    print(table, end="")
    for r in results:
        print(f"wrote {r['outputs']['json']}")
    if curve:
        print(f"wrote {curve['png']}")
    return {"results": results, "table": table, "curve": curve}


def run_table(paths: Sequence[str]) -> Dict[str, Any]:
    """``--table``: merge result files into one Markdown table (curve files are skipped)."""
    from blsam.evaluation.report import load_results, table_markdown

    results, skipped = load_results(paths)
    for s in skipped:
        print(f"note: {s} is a keep-ratio curve, not a table row; skipped", file=sys.stderr)
    text = table_markdown(results)
    print(text, end="")
    return {"table": text, "results": results}


# --------------------------------------------------------------------------- main
def main(args: argparse.Namespace) -> Optional[Dict[str, Any]]:
    """Evaluate every protocol (at every keep ratio); returns ``{"results", "table",
    "curve"}`` on rank 0 (None on other ranks)."""
    if args.table:
        return run_table(args.table)
    protos = check_args(args)
    refs: List[Dict[str, Any]] = []
    if args.reference:
        from blsam.evaluation.report import load_results

        refs = load_results(args.reference)[0]
        lines = {(c.name, args.dataset) for c in protos}
        for ref in refs:  # now, not after the evaluation
            if (ref["protocol"]["name"], ref["dataset_kind"]) not in lines:
                raise OptionError(f"--reference {ref['_file']}: {ref['protocol']['name']} on "
                                  f"{ref['dataset_kind']} is none of this run's protocols "
                                  f"{sorted(lines)}")

    from blsam.utils.dist import cleanup, init_distributed

    info = init_distributed(args.device, timeout_min=args.dist_timeout)
    try:
        out = _evaluate(args, protos, refs, info)
    except Exception as e:
        if not getattr(e, "all_ranks", False):  # else cli prints it on every rank, then cleans up
            cleanup()
        raise
    cleanup()
    return out


def _evaluate(args: argparse.Namespace, protos: Sequence[ProtocolConfig],
              refs: List[Dict[str, Any]], info: Any) -> Optional[Dict[str, Any]]:
    """Load, build, evaluate at every keep ratio (each rank's shard gathered to rank 0 only),
    then, once every rank has finished every keep ratio, metrics and files on rank 0 alone: no
    rank waits in a collective while rank 0 runs COCOeval / LVISEval."""
    from blsam.evaluation.report import file_sha256
    from blsam.evaluation.runner import Evaluator, Predictor, merge_shards
    from blsam.utils.collectives import check_peers, fail_together, gather_to_main

    log_dir = args.output
    with fail_together(log_dir):
        data = load_data(args, protos)
    with fail_together(log_dir):
        sam = build_model(args).to(info.device).eval()
    blvit = args.model in KEEP
    keeps: List[Optional[float]] = (list(args.keep_ratios) if args.keep_ratios else
                                    [args.keep_ratio]) if blvit else [None]
    gflops: Dict[Optional[float], Optional[float]] = {}
    for keep in keeps:  # before evaluating: inference-mode caches break the counter's trace
        if keep is not None:
            sam.image_encoder.keep_ratio = keep
        gflops[keep] = None if args.no_flops or not info.is_main else sam_gflops(sam)
    evaluator = Evaluator(Predictor(sam), data.dataset, args.img_dir, protos,
                          data.detections, args.skip_bad_images, args.exif_orientation)
    shard = data.found[info.rank::info.world_size]
    merged_by_keep, walls = {}, {}
    for keep in keeps:
        if keep is not None:
            sam.image_encoder.keep_ratio = keep
        t0 = time.perf_counter()
        with fail_together(log_dir), torch.inference_mode(), torch.autocast(
                info.device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16"):
            part = evaluator.run(shard, data.missing if info.is_main else [],
                                 progress=info.is_main and not args.no_progress,
                                 bad=data.bad if info.is_main else [], should_stop=check_peers)
        shards = gather_to_main(part)  # rank 0 only: detections are not copied to every rank
        del part
        walls[keep] = time.perf_counter() - t0
        if info.is_main:
            merged_by_keep[keep] = merge_shards(shards)
        del shards
    if not info.is_main:  # nothing left for this rank: no collective waits on rank 0's metrics
        return None
    ckpt_sha = file_sha256(args.checkpoint or args.sam_checkpoint)  # once per run
    results = [make_result(args, cfg, protos, merged_by_keep[keep], data, keep, gflops[keep],
                           walls[keep], info.world_size, str(info.device), ckpt_sha)
               for keep in keeps for cfg in protos]
    return write_results(args, results, merged_by_keep, refs)


def cli(argv: Optional[List[str]] = None) -> int:
    """``blsam-eval``: bad input ends with one ``error:`` line (exit 2), not a traceback."""
    from blsam.utils.dist import RankError

    return run_cli(lambda: main(parse_args(argv)), (RankError,), extra="eval", argv=argv)


if __name__ == "__main__":
    sys.exit(cli())
