"""Export a model's weights alone, to share: a checkpoint in, one ``.safetensors`` out with the
registry name, keep ratio and image size in its metadata (``blsam.weights``).

    blsam-export-weights --model b_t --checkpoint runs/b_t/final.pth --output blsam_b_t.safetensors

The checkpoint is loaded into the model first (strict key and shape checks), so a file that
would not load is refused here, not by whoever downloads it. The result loads with
``blsam_model_registry["b_t"](checkpoint="blsam_b_t.safetensors")`` or, from a folder or the
Hub, ``blsam.hub.BLViTSam.from_pretrained`` (README, "Weights to share").
"""
from __future__ import annotations

import argparse
import sys

from blsam.utils.cli import (
    HelpFormatter,
    OptionError,
    add_model_args,
    check_model_args,
    one_line_parse_errors,
    require_extra,
    run_cli,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_model_args(p, device=False)
    p.add_argument("--output", required=True, help="the .safetensors file to write")
    p.add_argument("--hub-folder", action="store_true",
                   help="--output is a folder: write model.safetensors and config.json there, "
                        "as save_pretrained does (needs blsam[hub])")
    return one_line_parse_errors(p).parse_args(argv)


def main(args: argparse.Namespace) -> str:
    from blsam import build_model
    from blsam.weights import save_weights

    check_model_args(args)
    if args.hub_folder:
        require_extra("hub")
    if args.checkpoint is None and args.sam_checkpoint is None:
        raise OptionError("give --checkpoint (or --sam-checkpoint): there is nothing to export")
    if not args.hub_folder and not args.output.endswith(".safetensors"):
        raise OptionError(f"--output {args.output!r}: name it *.safetensors (or use --hub-folder)")
    sam = build_model(args.model, args.checkpoint, args.sam_checkpoint, args.keep_ratio,
                      args.img_size)
    if args.hub_folder:
        from blsam.hub import BLViTSam

        BLViTSam.wrap(sam, args.model, args.keep_ratio, args.img_size).save_pretrained(
            args.output)
        out = args.output
    else:
        out = save_weights(sam, args.output, args.model, args.keep_ratio, args.img_size)
    print(f"wrote {out} ({args.model}, keep_ratio {args.keep_ratio}, img_size {args.img_size})")
    return out


def cli(argv: list[str] | None = None) -> int:
    """``blsam-export-weights``: a user error is one ``error:`` line and exit 2."""
    return run_cli(lambda: main(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(cli())
