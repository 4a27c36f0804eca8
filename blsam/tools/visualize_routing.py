"""Routing figure (paper Fig. 3): which tokens each predictor sent to the big P-blocks.

    python tools/visualize_routing.py photo.jpg --checkpoint blsam_b_t.pth --output routing.png

One panel per predictor stage, routed tokens bright and the others dimmed, drawn over the
original image (the encoder's resize and padding are undone).
"""
from __future__ import annotations

import argparse
import os
import sys

from blsam.specs import KEEP_RATIO_MODELS
from blsam.utils.cli import add_model_args, one_line_parse_errors, resolved_keep_ratio, run_tool


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("image", nargs="?", default=None,
                   help="RGB image file; default: the bundled astronaut photo")
    add_model_args(p, choices=KEEP_RATIO_MODELS)
    p.add_argument("--skip-padding", action="store_true",
                   help="padding-aware routing: never route the zero padding SamPredictor "
                        "adds (beyond the paper; default: the paper's per-window top-k)")
    p.add_argument("--show-padding", action="store_true",
                   help="draw the encoder's padded square input, padding included")
    p.add_argument("--output", default="outputs/routing.png")
    return one_line_parse_errors(p).parse_args(argv)


def main(args: argparse.Namespace) -> str:
    import warnings

    from segment_anything import SamPredictor

    from blsam import build_model
    from blsam.utils.images import load_rgb_image
    from blsam.visualization import save_routing_figure

    image = load_rgb_image(args.image)  # fail on a bad image before building a model
    if args.checkpoint is None and args.sam_checkpoint is None:
        warnings.warn("no --checkpoint/--sam-checkpoint: random predictors, the routing is "
                      "arbitrary (a trained bLViT-SAM checkpoint shows the learned one)",
                      stacklevel=2)
    args.keep_ratio = resolved_keep_ratio(args.model, args.keep_ratio)
    sam = build_model(args.model, args.checkpoint, args.sam_checkpoint, args.keep_ratio,
                      args.img_size, skip_padding=args.skip_padding).to(args.device).eval()
    predictor = SamPredictor(sam)
    predictor.set_image(image)  # SAM's own preprocessing; the encoder records its routing
    routing = sam.image_encoder.last_routing
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    name = os.path.basename(args.image) if args.image else "astronaut"
    mode = ", skip_padding" if args.skip_padding else ""
    save_routing_figure(image, routing, args.img_size, args.output,
                        title=f"{args.model} on {name}: tokens routed to P-blocks "
                              f"(keep {args.keep_ratio:g}{mode})",
                        show_padding=args.show_padding)
    print(f"wrote {args.output} ({len(routing)} predictor stages)")
    return args.output


def cli(argv: list[str] | None = None) -> int:
    """``blsam-visualize-routing``: a user error is one ``error:`` line and exit 2."""
    return run_tool(parse_args, main, argv, extra="demo")  # model options checked first


if __name__ == "__main__":
    sys.exit(cli())
