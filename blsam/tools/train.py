"""Distil a bLViT-SAM student from vanilla SAM on SA-1B (single process or torchrun DDP).

    python tools/train.py --config configs/distill_b_t.yaml --data /data/sa1b \
        --sam-checkpoint sam_vit_b_01ec64.pth --output-dir runs/b_t
    torchrun --nproc_per_node 8 tools/train.py --config configs/distill_h_b.yaml ...
    python tools/train.py ... --resume auto
    python tools/train.py --config ... --val-only --checkpoint runs/b_t/final.pth

A user error (bad option, data, teacher cache, checkpoint, resume, output folder, ranks that
disagree) is one ``error:`` line on stderr and exit code 2, never a traceback. Exit codes:
0 done (or --stop-after), 2 user error, 3 too many non-finite steps (one line naming the step
and the newest good checkpoint), 75 stopped by SIGTERM/SIGUSR1/SIGINT with a checkpoint
written (rerun with --resume auto), 130 a second Ctrl-C (no checkpoint).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import List, Optional

from blsam.train.cluster import EXIT_INTERRUPTED, EXIT_NONFINITE, EXIT_PREEMPTED, NonFiniteError
from blsam.train.options import build_parser, train
from blsam.utils.cli import one_line, one_line_parse_errors, run_cli
from blsam.utils.config import parse_args_with_config


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    return parse_args_with_config(one_line_parse_errors(build_parser()), argv)


def main(args: argparse.Namespace) -> int:
    """Train; the exit code: 0, or EXIT_PREEMPTED when a signal stopped the run."""
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    try:
        out = train(args)
        if args.val_only and rank == 0:
            print(json.dumps(out))
    finally:
        from blsam.utils.dist import cleanup

        cleanup()
    return EXIT_PREEMPTED if out.get("preempted") else 0


def cli(argv: Optional[List[str]] = None) -> int:
    """Command-line entry (``blsam-train``): a user error is one ``error:`` line and exit 2;
    too many non-finite steps exit 3; a second Ctrl-C exits 130 (docs/training.md)."""

    def body() -> int:
        try:
            return main(parse_args(argv))
        except NonFiniteError as e:
            print(f"error: {one_line(e)}", file=sys.stderr)
            return EXIT_NONFINITE
        except KeyboardInterrupt:
            print("error: interrupted (a second Ctrl-C): no checkpoint written for the steps "
                  "since the last save", file=sys.stderr)
            return EXIT_INTERRUPTED

    return run_cli(body, extra="train", argv=argv)


if __name__ == "__main__":
    sys.exit(cli())
