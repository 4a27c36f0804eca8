"""Demo: bLViT-SAM (B+T) segments a real photo from one point prompt, like SAM.

Writes an overlay of the predicted mask and a map of the tokens each predictor routed to the
big P-blocks. Without a trained checkpoint the weights are random (the masks then mean nothing,
but everything runs exactly as it would with real weights). The encoder time printed is one
cold call (``set_image``, first use of every buffer, with whatever allocator the process has:
glibc's default here), not the warm medians of the README's latency table.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import numpy as np

from blsam.utils.cli import add_model_args, one_line_parse_errors, resolved_keep_ratio, run_tool


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    add_model_args(p)
    p.add_argument("--image", default=None, help="RGB image file; default: skimage astronaut")
    p.add_argument("--point", type=int, nargs=2, default=None, metavar=("X", "Y"),
                   help="foreground point in pixels; default: image centre")
    p.add_argument("--output-dir", default="outputs/demo")
    return one_line_parse_errors(p).parse_args(argv)


def main(args: argparse.Namespace) -> dict:
    import cv2
    from segment_anything import SamPredictor

    from blsam import build_model
    from blsam.utils.images import load_rgb_image
    from blsam.visualization import overlay_mask, save_routing_figure

    if args.checkpoint is None and args.sam_checkpoint is None:
        warnings.warn("no --checkpoint/--sam-checkpoint given: random weights, masks are "
                      "not meaningful (see README for the official SAM checkpoints)", stacklevel=2)
    args.keep_ratio = resolved_keep_ratio(args.model, args.keep_ratio)
    sam = build_model(args.model, args.checkpoint, args.sam_checkpoint, args.keep_ratio,
                      args.img_size).to(args.device).eval()

    image = load_rgb_image(args.image)
    h, w = image.shape[:2]
    point = np.array([args.point if args.point else (w // 2, h // 2)])
    predictor = SamPredictor(sam)
    t0 = time.perf_counter()
    predictor.set_image(image)
    t_enc = time.perf_counter() - t0
    masks, scores, _ = predictor.predict(point_coords=point, point_labels=np.array([1]),
                                         multimask_output=True)
    best = int(np.argmax(scores))

    os.makedirs(args.output_dir, exist_ok=True)
    overlay = overlay_mask(image, masks[best])
    cv2.circle(overlay, tuple(int(v) for v in point[0]), 6, (255, 40, 40), -1)
    overlay_path = os.path.join(args.output_dir, "mask_overlay.png")
    cv2.imwrite(overlay_path, cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR))
    result = {"overlay": overlay_path, "encoder_seconds": t_enc, "score": float(scores[best]),
              "mask_pixels": int(masks[best].sum())}
    routing = getattr(sam.image_encoder, "last_routing", None)
    if routing:
        routing_path = os.path.join(args.output_dir, "routing_map.png")
        save_routing_figure(image, routing, args.img_size, routing_path,
                            title=f"{args.model}: tokens routed to P-blocks "
                                  f"(keep {args.keep_ratio})")
        result["routing_map"] = routing_path
    print(f"{args.model}: image encoder {t_enc:.2f} s on {args.device} (one cold set_image "
          f"call with the default allocator; warm medians: README's latency table); "
          f"best mask score {result['score']:.3f}, {result['mask_pixels']} px")
    for k in ("overlay", "routing_map"):
        if k in result:
            print(f"wrote {result[k]}")
    return result


def cli(argv: list[str] | None = None) -> int:
    """``blsam-demo``: a user error is one ``error:`` line and exit 2."""
    return run_tool(parse_args, main, argv, extra="demo")  # model options checked first


if __name__ == "__main__":
    sys.exit(cli())
