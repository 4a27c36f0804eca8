"""Export the bLViT image encoder (fixed keep ratio) to ONNX and check it with onnxruntime.

    blsam-export-onnx --model b_t --checkpoint blsam_b_t.pth --output blsam_b_t.onnx
    blsam-export-onnx ... --export-decoder     # also SAM's prompt decoder, as SAM does

The encoder graph takes SAM's preprocessed image (1, 3, S, S) float32 (resized longest side S,
normalised, padded; ``SamPredictor``'s preprocessing) and returns ``image_embeddings``
(1, 256, S/16, S/16). The keep ratio is baked in: k tokens per window is a shape. The check
runs a real photo through PyTorch and onnxruntime and reports the max abs difference. See
docs/onnx.md for using it with SAM's exported decoder.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings

import numpy as np
import torch

from blsam.errors import UserError
from blsam.utils.cli import (
    OptionError,
    add_model_args,
    check_model_args,
    one_line_parse_errors,
    resolved_keep_ratio,
    run_tool,
)

DEFAULT_OPSET = 17


class ExportCheckError(UserError):
    """onnxruntime's embeddings differ from PyTorch's by more than ``--atol`` (or are NaN)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(p, device=False)
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    p.add_argument("--no-fused-attention", dest="fused_attention", action="store_false",
                   help="standard ONNX ops only, no com.microsoft MultiHeadAttention (for "
                        "runtimes other than ONNX Runtime; slower there)")
    p.add_argument("--output", default="outputs/onnx/blsam_encoder.onnx")
    p.add_argument("--export-decoder", action="store_true",
                   help="also export SAM's prompt encoder + mask decoder (SamOnnxModel)")
    p.add_argument("--image", default=None, help="photo for the check; default: astronaut")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime check")
    p.add_argument("--atol", type=float, default=1e-3,
                   help="fail if the max abs difference of the embeddings exceeds this")
    return one_line_parse_errors(p).parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """The model options every tool checks, and an ``--atol`` a difference can be compared
    with (``nan`` would pass every check: ``NaN > atol`` is false)."""
    check_model_args(args)
    if not (args.atol >= 0 and math.isfinite(args.atol)):
        raise OptionError(f"--atol must be a finite number >= 0, got {args.atol}")


def accuracy_problem(max_abs_diff: float, atol: float) -> str | None:
    """Why the exported encoder fails the check (None when it passes): a NaN difference (NaN
    embeddings on either side) fails, as ``diff <= atol`` is false for it."""
    if max_abs_diff <= atol:
        return None
    return (f"onnxruntime differs from PyTorch: max abs diff {max_abs_diff:.3g} > --atol {atol}"
            if max_abs_diff == max_abs_diff else
            "onnxruntime or PyTorch embeddings are NaN: the export cannot be checked")


def preprocess(sam: torch.nn.Module, image: np.ndarray) -> torch.Tensor:
    """SAM's own preprocessing (what ``SamPredictor.set_image`` feeds the encoder)."""
    from segment_anything.utils.transforms import ResizeLongestSide

    resized = ResizeLongestSide(sam.image_encoder.img_size).apply_image(image)
    x = torch.as_tensor(resized).permute(2, 0, 1).contiguous()[None].float()
    return sam.preprocess(x)


def export_encoder(
    sam: torch.nn.Module, path: str, opset: int, fused_attention: bool = True
) -> None:
    """Export ``sam.image_encoder`` to ``path``.

    ``fused_attention``: every bLViT attention becomes one ONNX Runtime
    ``com.microsoft.MultiHeadAttention`` node (fused CPU kernels; see docs/onnx.md); False keeps
    the graph to standard ONNX ops for other runtimes. SAM's own encoder exports unchanged.
    """
    from blsam.utils.onnx import export_attention

    enc = sam.image_encoder.eval()
    size = enc.img_size
    x = torch.randn(1, 3, size, size)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with export_attention(fused_attention), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer/constant-folding chatter; the check counts
        torch.onnx.export(enc, (x,), path, input_names=["image"],
                          output_names=["image_embeddings"], opset_version=opset, dynamo=False)


def _traceable_sam_onnx_model(sam: torch.nn.Module) -> torch.nn.Module:
    """SAM's ONNX decoder wrapper with a crop that stays dynamic when traced.

    Upstream crops the upscaled masks with ``int(prepadded_size[i])``; the tracer turns that
    into a constant taken from the dummy image size, so every other aspect ratio gets wrongly
    cropped masks. Selecting the rows/columns with ``arange`` keeps the size a graph value.
    """
    import torch.nn.functional as F
    from segment_anything.utils.onnx import SamOnnxModel

    class TraceableSamOnnxModel(SamOnnxModel):
        def mask_postprocessing(self, masks: torch.Tensor, orig_im_size: torch.Tensor):
            masks = F.interpolate(masks, size=(self.img_size, self.img_size), mode="bilinear",
                                  align_corners=False)
            pre = self.resize_longest_image_size(orig_im_size, self.img_size)
            masks = masks.index_select(2, torch.arange(pre[0], device=masks.device))
            masks = masks.index_select(3, torch.arange(pre[1], device=masks.device))
            h, w = orig_im_size.to(torch.int64)[0], orig_im_size.to(torch.int64)[1]
            return F.interpolate(masks, size=(h, w), mode="bilinear", align_corners=False)

    return TraceableSamOnnxModel(sam, return_single_mask=True).eval()


def export_decoder(sam: torch.nn.Module, path: str, opset: int) -> None:
    """SAM's decoder export (``scripts/export_onnx_model.py``), on the same model object."""
    onnx_model = _traceable_sam_onnx_model(sam)
    emb = sam.prompt_encoder.image_embedding_size
    dummy = {
        "image_embeddings": torch.randn(1, 256, *emb),
        "point_coords": torch.randint(0, 1024, (1, 5, 2), dtype=torch.float),
        "point_labels": torch.randint(0, 4, (1, 5), dtype=torch.float),
        "mask_input": torch.randn(1, 1, 4 * emb[0], 4 * emb[1]),
        "has_mask_input": torch.tensor([1], dtype=torch.float),
        "orig_im_size": torch.tensor([1500, 2250], dtype=torch.float),
    }
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(onnx_model, tuple(dummy.values()), path, input_names=list(dummy),
                          output_names=["masks", "iou_predictions", "low_res_masks"],
                          dynamic_axes={"point_coords": {1: "num_points"},
                                        "point_labels": {1: "num_points"}},
                          opset_version=opset, do_constant_folding=True, dynamo=False)


def check_encoder(sam: torch.nn.Module, path: str, image: np.ndarray) -> dict[str, float]:
    """Max abs difference between onnxruntime and PyTorch embeddings of a real photo."""
    import onnxruntime as ort

    x = preprocess(sam, image)
    with torch.no_grad():
        ref = sam.image_encoder(x).numpy()
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    out = sess.run(None, {"image": x.numpy()})[0]
    diff = float(np.abs(out - ref).max())
    return {"max_abs_diff": diff, "embedding_abs_max": float(np.abs(ref).max())}


def main(args: argparse.Namespace) -> dict[str, object]:
    from blsam import build_model
    from blsam.utils.images import load_rgb_image

    if args.checkpoint is None and args.sam_checkpoint is None:
        warnings.warn("no --checkpoint/--sam-checkpoint: exporting random weights", stacklevel=2)
    args.keep_ratio = resolved_keep_ratio(args.model, args.keep_ratio)
    sam = build_model(args.model, args.checkpoint, args.sam_checkpoint, args.keep_ratio,
                      args.img_size).eval()
    export_encoder(sam, args.output, args.opset, args.fused_attention)
    report: dict[str, object] = {"encoder": args.output, "model": args.model,
                                 "keep_ratio": args.keep_ratio, "img_size": args.img_size}
    if args.export_decoder:
        dec = os.path.splitext(args.output)[0] + "_decoder.onnx"
        export_decoder(sam, dec, args.opset)
        report["decoder"] = dec
    if not args.no_check:
        report.update(check_encoder(sam, args.output, load_rgb_image(args.image)))
        problem = accuracy_problem(float(report["max_abs_diff"]), args.atol)
        if problem is not None:
            raise ExportCheckError(problem)
    print(json.dumps(report, indent=1))
    return report


def cli(argv: list[str] | None = None) -> int:
    """``blsam-export-onnx``: a user error is one ``error:`` line and exit 2."""
    return run_tool(parse_args, main, argv, check=check_args, extra="onnx")


if __name__ == "__main__":
    sys.exit(cli())
