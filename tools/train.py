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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from blsam.checkpoint import CheckpointError  # noqa: E402
from blsam.train.cluster import (EXIT_INTERRUPTED, EXIT_NONFINITE, EXIT_PREEMPTED,  # noqa: E402
                                 EXIT_USAGE, NonFiniteError, OutputDirError, RankMismatchError)
from blsam.train.data import DataError  # noqa: E402
from blsam.train.engine import UsageError, build_parser, train  # noqa: E402
from blsam.train.packed_cache import CacheError  # noqa: E402
from blsam.train.resume import ResumeError  # noqa: E402
from blsam.utils.cli import OptionError  # noqa: E402
from blsam.utils.config import ConfigError, parse_args_with_config  # noqa: E402

USER_ERRORS = (UsageError, DataError, CheckpointError, ResumeError, ConfigError,
               FileNotFoundError, CacheError, OptionError, OutputDirError, RankMismatchError)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = build_parser()

    def error(message: str) -> None:  # argparse's usage block + error: one line here
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)

    parser.error = error  # type: ignore[method-assign]
    return parse_args_with_config(parser, argv)


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


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split("\n")).strip() or type(e).__name__


def cli(argv: Optional[List[str]] = None) -> int:
    """Command-line entry: bad input ends with one ``error:`` line and exit code 2."""
    try:
        try:
            args = parse_args(argv)
        except SystemExit as e:  # --help (0) or a parse error, already printed as one line
            return int(e.code or 0)
        return main(args)
    except USER_ERRORS as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except NonFiniteError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return EXIT_NONFINITE
    except KeyboardInterrupt:
        print("error: interrupted (a second Ctrl-C): no checkpoint written for the steps since "
              "the last save", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(cli())
