"""Cache the SAM teacher's image embeddings for distillation (packed fp16 parts + index).

    python tools/cache_teacher.py --data /data/sa1b --model h_b \
        --sam-checkpoint sam_vit_h_4b8939.pth --output cache/vit_h_1024
    torchrun --nproc_per_node 8 tools/cache_teacher.py ...   # one part file per rank
    python tools/train.py ... --teacher-cache cache/vit_h_1024
"""
from __future__ import annotations

import argparse
import logging
import sys

from blsam.train.cache import CacheConfig, build_parser, cache_teacher
from blsam.utils.cli import one_line_parse_errors, run_cli
from blsam.utils.config import parse_args_with_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return parse_args_with_config(one_line_parse_errors(build_parser()), argv)


def main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        print(cache_teacher(CacheConfig.from_options(vars(args))))
    finally:
        from blsam.utils.dist import cleanup

        cleanup()


def cli(argv: list[str] | None = None) -> int:
    """``blsam-cache-teacher``: a user error (data, cache, checkpoint, option) is one
    ``error:`` line and exit 2."""
    return run_cli(lambda: main(parse_args(argv)), extra="train", argv=argv)


if __name__ == "__main__":
    sys.exit(cli())
