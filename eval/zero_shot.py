"""Zero-shot evaluation of bLViT-SAM / SAM (paper §4.4, Table 2).

Point (1 or 3 random clicks inside each GT mask) and box (GT box) prompts report mIoU on LVIS;
detector boxes (e.g. ViTDet) report mask AP with COCOeval / LVISEval::

    python eval/zero_shot.py --model b_t --checkpoint blsam_b_t.pth --dataset lvis \\
        --ann-file lvis_v1_val.json --img-dir coco/ --prompt point --num-points 3 --output out/
    torchrun --nproc_per_node 8 eval/zero_shot.py ...   # images sharded, rank 0 merges
    python eval/zero_shot.py --table out/*.json         # merge rows into Table 2

See docs/evaluation.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from typing import Any, Dict, List, Optional

if __package__ in (None, ""):  # `python eval/zero_shot.py`: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from blsam.utils.config import parse_args_with_config  # noqa: E402

MODELS = ("b_t", "h_b", "vit_b", "vit_l", "vit_h")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML file of option defaults")
    p.add_argument("--model", choices=MODELS, default="b_t")
    p.add_argument("--name", default=None, help="row name in the table (default: paper's name)")
    p.add_argument("--checkpoint", default=None,
                   help="trained bLViT-SAM state dict (b_t/h_b) or official SAM file (vit_*)")
    p.add_argument("--sam-checkpoint", default=None,
                   help="b_t/h_b without a trained checkpoint: init P-blocks from SAM "
                        "(results are not meaningful)")
    p.add_argument("--keep-ratio", type=float, default=0.25)
    p.add_argument("--img-size", type=int, default=1024)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dataset", choices=("coco", "lvis"), default="lvis")
    p.add_argument("--ann-file", default=None, help="COCO instances / LVIS v1 json")
    p.add_argument("--img-dir", default=None,
                   help="folder with the images, directly or in train2017/ and val2017/")
    p.add_argument("--prompt", choices=("point", "box", "detector"), default="point")
    p.add_argument("--num-points", type=int, default=1, help="point prompt: clicks per object")
    p.add_argument("--point-from", choices=("random", "center"), default="random",
                   help="random: uniform inside the mask (paper); center: farthest from boundary")
    p.add_argument("--oracle", action="store_true",
                   help="1 point: keep the multimask output with the best IoU to GT")
    p.add_argument("--num-clicks", type=int, default=0,
                   help="extra correction clicks (center of the largest error region)")
    p.add_argument("--det-file", default=None, help="detector results (COCO results format)")
    p.add_argument("--max-dets", type=int, default=None,
                   help="detections per image, best scores first (default: 300 on LVIS, all "
                        "on COCO)")
    p.add_argument("--batch-prompts", type=int, default=64, help="prompts per decoder batch")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N images")
    p.add_argument("--seed", type=int, default=0, help="point sampling seed")
    p.add_argument("--skip-missing-images", action="store_true",
                   help="skip (and count) images that are not in --img-dir instead of failing")
    p.add_argument("--save-predictions", default=None,
                   help="write every mask (COCO RLE) with its prompt: .jsonl or .json")
    p.add_argument("--output", default="outputs/eval", help="folder for the JSON and .md")
    p.add_argument("--no-flops", action="store_true", help="do not count GFLOPs")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--table", nargs="+", default=None, metavar="JSON",
                   help="only merge result JSON files into one Table 2 and print it")
    return p


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    return parse_args_with_config(build_parser(), argv)


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
        name += " (SAM init)" if args.sam_checkpoint and args.model in ("b_t", "h_b") else \
            (" (random)" if not args.sam_checkpoint else "")
    return name


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    import blsam

    if args.checkpoint and args.sam_checkpoint:
        raise ValueError("give --checkpoint or --sam-checkpoint, not both")
    if args.checkpoint is None:
        if args.sam_checkpoint is not None and args.model in ("b_t", "h_b"):
            warnings.warn(f"{args.model}: no trained checkpoint, E-blocks and predictors are "
                          f"untrained (P-blocks from {args.sam_checkpoint}): results are not "
                          f"meaningful", UserWarning)
        elif args.sam_checkpoint is None:
            warnings.warn(f"{args.model}: no checkpoint, evaluating random weights: results are "
                          f"not meaningful", UserWarning)
    return blsam.build_model(args.model, args.checkpoint, args.sam_checkpoint, args.keep_ratio,
                             args.img_size)


def _check_args(args: argparse.Namespace) -> None:
    for opt in ("ann_file", "img_dir"):
        if not getattr(args, opt):
            raise SystemExit(f"error: --{opt.replace('_', '-')} is required")
    if args.prompt == "detector" and not args.det_file:
        raise SystemExit("error: --prompt detector needs --det-file (COCO-format detections)")
    if args.limit is not None and args.limit < 1:
        raise SystemExit("error: --limit must be >= 1")


def main(args: argparse.Namespace) -> Optional[Dict[str, Any]]:
    """Run one protocol; returns the result dict on rank 0 (None on other ranks)."""
    from blsam.evaluation.report import DISPLAY_NAMES, file_sha256, table_markdown, write_outputs

    if args.table:
        results = [json.load(open(p, encoding="utf-8")) for p in args.table]
        text = table_markdown(results)
        print(text)
        return {"table": text}
    _check_args(args)

    from segment_anything import SamPredictor

    from blsam.evaluation.datasets import check_lvis_eval_fields, load_dataset, load_detections
    from blsam.evaluation.report import write_predictions
    from blsam.evaluation.runner import (
        Evaluator,
        ProtocolConfig,
        compute_metrics,
        locate_images,
        merge_shards,
    )
    from blsam.utils.dist import all_gather_objects, cleanup, init_distributed

    info = init_distributed(args.device)
    try:
        dataset = load_dataset(args.ann_file, args.dataset)
        detections = None
        if args.prompt == "detector":
            if dataset.kind == "lvis":
                check_lvis_eval_fields(dataset.raw, args.ann_file)
            detections = load_detections(args.det_file, dataset)
        max_dets = args.max_dets if args.max_dets is not None else (
            300 if dataset.kind == "lvis" and args.prompt == "detector" else None)
        cfg = ProtocolConfig(
            prompt=args.prompt, num_points=args.num_points, point_from=args.point_from,
            oracle=args.oracle, num_clicks=args.num_clicks, seed=args.seed,
            batch_prompts=args.batch_prompts, max_dets=max_dets,
            skip_missing_images=args.skip_missing_images,
            save_predictions=bool(args.save_predictions))
        cfg.validate()
        # every rank checks every image, so a missing file fails all ranks alike (no hang)
        found, missing = locate_images(args.img_dir, list(enumerate(dataset.images))[: args.limit],
                                       args.skip_missing_images)
        shard = found[info.rank::info.world_size]

        sam = build_model(args).to(info.device).eval()
        # before evaluating: caches built under inference_mode would break the counter's trace
        gflops = None if args.no_flops or not info.is_main else sam_gflops(sam)
        predictor = SamPredictor(sam)
        evaluator = Evaluator(predictor, dataset, args.img_dir, cfg, detections)
        t0 = time.perf_counter()
        with torch.inference_mode():
            part = evaluator.run(shard, missing if info.is_main else [],
                                 progress=info.is_main and not args.no_progress)
        merged = merge_shards(all_gather_objects(part))
        wall = time.perf_counter() - t0
        if not info.is_main:
            return None

        metrics = compute_metrics(merged, dataset, cfg)
        n_img = len(merged["evaluated_image_ids"])
        ckpt = args.checkpoint or args.sam_checkpoint
        result: Dict[str, Any] = {
            "name": args.name or _row_name(args, DISPLAY_NAMES),
            "config": {k: v for k, v in vars(args).items() if k != "table"},
            "model": args.model,
            "checkpoint": ckpt,
            "checkpoint_sha256": file_sha256(ckpt),
            "dataset_kind": dataset.kind,
            "versions": _versions(),
            "counts": {
                "images": n_img,
                "annotations_evaluated": len(merged["records"]),
                "detections_evaluated": len(merged["results"]),
                "skipped_crowd": merged["counts"]["skipped_crowd"],
                "skipped_empty": merged["counts"]["skipped_empty"],
                "missing_images": len(merged["missing_images"]),
            },
            "metrics": metrics,
            "gflops": gflops,
            "gflops_convention": "paper",
            "timing": {"world_size": info.world_size, "wall_s": wall,
                       "model_s_per_image": (sum(merged["seconds_per_rank"]) / n_img
                                             if n_img else None),
                       "device": str(info.device)},
        }
        if args.save_predictions:
            items = merged["predictions"] if args.prompt != "detector" else merged["results"]
            result["predictions_file"] = write_predictions(items, args.save_predictions)
        result["outputs"] = write_outputs(result, args.output)
        print(table_markdown([result]), end="")
        print(f"metrics: {json.dumps(metrics)}")
        print(f"wrote {result['outputs']['json']}")
        return result
    finally:
        cleanup()


def cli(argv: Optional[List[str]] = None) -> int:
    """Command-line entry: bad input ends with one ``error:`` line, not a traceback."""
    from blsam.checkpoint import CheckpointError
    from blsam.evaluation.datasets import DatasetError
    from blsam.utils.config import ConfigError

    try:
        main(parse_args(argv))
    except (DatasetError, CheckpointError, ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
