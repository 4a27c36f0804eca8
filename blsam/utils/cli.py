"""Command-line options every model-loading tool shares (same names, same meaning)."""
from __future__ import annotations

import argparse
from typing import Optional, Sequence


def add_model_args(
    p: argparse.ArgumentParser, choices: Optional[Sequence[str]] = None, device: bool = True
) -> argparse.ArgumentParser:
    """--model/--checkpoint/--sam-checkpoint/--keep-ratio/--img-size[/--device], as taken by
    ``blsam.build_model``."""
    import torch

    p.add_argument("--model", default="b_t", choices=choices,
                   help="registry key: b_t, h_b (bLViT-SAM) or vit_b, vit_l, vit_h (SAM)")
    p.add_argument("--checkpoint", default=None,
                   help="trained bLViT-SAM state dict (or an official SAM one for vit_*)")
    p.add_argument("--sam-checkpoint", default=None, help="official SAM checkpoint (P-block init)")
    p.add_argument("--keep-ratio", type=float, default=0.25)
    p.add_argument("--img-size", type=int, default=1024)
    if device:
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p
