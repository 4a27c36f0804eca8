"""Zero-shot evaluation of bLViT-SAM / SAM (paper §4.4, Table 2).

Point (1 or 3 clicks inside each GT mask) and box (GT box) prompts report mIoU on LVIS; detector
boxes (e.g. ViTDet) report mask AP with COCOeval / LVISEval. Several protocols in one run share
one encoder pass per image; --keep-ratios evaluates one bLViT checkpoint at several keep ratios::

    python eval/zero_shot.py --model b_t --checkpoint blsam_b_t.pth --dataset lvis \\
        --ann-file lvis_v1_val.json --img-dir coco/ --prompt point1 point3 box --output out/
    python eval/zero_shot.py ... --keep-ratios 0.1 0.25 0.5 0.75 1.0 --reference out/vit_b_*.json
    torchrun --nproc_per_node 8 eval/zero_shot.py ...   # images sharded, rank 0 merges
    python eval/zero_shot.py --table out/*.json         # merge rows into Table 2

See docs/evaluation.md. This module is the command line only: the options become an
``EvalConfig`` (``blsam.evaluation.config``) that ``blsam.evaluation.pipeline.evaluate`` runs.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from blsam.evaluation.config import EvalConfig
from blsam.evaluation.pipeline import evaluate, table_of
from blsam.evaluation.protocol import POINT_MODES
from blsam.specs import BLVIT_MODELS, KEEP_RATIO_MODELS, MODEL_SPECS
from blsam.utils.cli import (
    HelpFormatter,
    OptionError,
    add_model_args,
    one_line_parse_errors,
    run_tool,
)
from blsam.utils.collectives import DEFAULT_TIMEOUT_MIN
from blsam.utils.config import parse_args_with_config
from blsam.utils.images import EXIF_MODES

MODELS = tuple(MODEL_SPECS)
BLVIT = BLVIT_MODELS
KEEP = KEEP_RATIO_MODELS  # bLViT and the token-pruning baselines


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
    o.add_argument("--paper", action="store_true",
                   help="with --table: all eight rows of the paper's Table 2, the paper's "
                        "numbers beside ours (GFLOPs of rows without a result computed)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return parse_args_with_config(one_line_parse_errors(build_parser()), argv)


def main(args: argparse.Namespace) -> dict[str, Any] | None:
    """Evaluate every protocol (at every keep ratio); returns ``{"results", "table",
    "curve"}`` on rank 0 (None on other ranks), the results as their JSON records; with
    ``--table`` only merges result files (``{"table", "results"}``)."""
    if args.paper and not args.table:
        raise OptionError("--paper adds the paper's rows to --table; give --table JSON files")
    if args.table:
        return table_of(args.table, paper=args.paper)
    run = evaluate(EvalConfig.from_dict(vars(args)))
    return None if run is None else run.to_json()


def cli(argv: list[str] | None = None) -> int:
    """``blsam-eval``: bad input ends with one ``error:`` line (exit 2), not a traceback."""
    from blsam.utils.dist import RankError

    # the options are checked by the pipeline (check_config), after --table's short cut
    return run_tool(parse_args, main, argv, check=None, extra="eval", extra_errors=(RankError,))


if __name__ == "__main__":
    sys.exit(cli())
