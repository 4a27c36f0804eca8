"""Command-line options every model-loading tool shares (same names, same meaning)."""
from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence


class OptionError(ValueError):
    """A command-line option whose value means nothing (a CLI prints it as one line, exit 2)."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``--help`` shows each option's default and keeps the module docstring's layout."""


def add_model_args(
    p: argparse.ArgumentParser, choices: Optional[Sequence[str]] = None, device: bool = True
) -> argparse.ArgumentParser:
    """--model/--checkpoint/--sam-checkpoint/--keep-ratio/--img-size[/--device], as taken by
    ``blsam.build_model``."""
    import torch

    p.add_argument("--model", default="b_t", choices=choices,
                   help="registry key: b_t, h_b (bLViT-SAM) or vit_b, vit_l, vit_h (SAM); "
                        "tiny_bl / tiny_vit are the test architectures")
    p.add_argument("--checkpoint", default=None,
                   help="trained bLViT-SAM state dict (or an official SAM one for vit_*)")
    p.add_argument("--sam-checkpoint", default=None, help="official SAM checkpoint (P-block init)")
    p.add_argument("--keep-ratio", type=float, default=0.25,
                   help="bLViT: share of tokens routed to the P-blocks, in (0, 1] (ignored by "
                        "vit_*)")
    p.add_argument("--img-size", type=int, default=1024,
                   help="model input size, a multiple of 16 (position tables are resized)")
    if device:
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                       help="cpu or cuda (under torchrun: this rank's GPU)")
    return p


def check_model_args(args: argparse.Namespace) -> None:
    """Refuse model options that mean nothing, before anything is built (``OptionError``)."""
    from ..specs import check_img_size, check_keep_ratio

    try:
        if getattr(args, "keep_ratio", None) is not None:
            check_keep_ratio(args.keep_ratio, "--keep-ratio")
        if getattr(args, "img_size", None) is not None:
            check_img_size(args.img_size, "--img-size")
    except ValueError as e:
        raise OptionError(str(e)) from None
    for opt in ("checkpoint", "sam_checkpoint"):
        path = getattr(args, opt, None)
        if path is not None and not os.path.isfile(path):
            raise OptionError(f"--{opt.replace('_', '-')} {path!r}: no such file")
    if getattr(args, "checkpoint", None) and getattr(args, "sam_checkpoint", None):
        raise OptionError("give --checkpoint or --sam-checkpoint, not both")
