"""Distil a bLViT-SAM student from vanilla SAM on SA-1B (single process or torchrun DDP).

    python tools/train.py --config configs/distill_b_t.yaml --data /data/sa1b \
        --sam-checkpoint sam_vit_b_01ec64.pth --output-dir runs/b_t
    torchrun --nproc_per_node 8 tools/train.py --config configs/distill_h_b.yaml ...
    python tools/train.py ... --resume auto
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from blsam.train.engine import build_parser, train  # noqa: E402
from blsam.utils.config import parse_args_with_config  # noqa: E402


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    return parse_args_with_config(build_parser(), argv)


def main(args: argparse.Namespace) -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    try:
        train(args)
    finally:
        from blsam.utils.dist import cleanup

        cleanup()


if __name__ == "__main__":
    main(parse_args())
