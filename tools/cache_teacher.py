"""Cache the SAM teacher's image embeddings for distillation (packed fp16 parts + index).

    python tools/cache_teacher.py --data /data/sa1b --model h_b \
        --sam-checkpoint sam_vit_h_4b8939.pth --output cache/vit_h_1024
    torchrun --nproc_per_node 8 tools/cache_teacher.py ...   # one part file per rank
    python tools/train.py ... --teacher-cache cache/vit_h_1024
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from blsam.train.cache import build_parser, cache_teacher  # noqa: E402
from blsam.utils.config import parse_args_with_config  # noqa: E402


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = build_parser()

    def error(message: str) -> None:  # argparse's usage block + error: one line here
        print(f"cache_teacher.py: error: {message}", file=sys.stderr)
        sys.exit(2)

    parser.error = error  # type: ignore[method-assign]
    return parse_args_with_config(parser, argv)


def main(args: argparse.Namespace) -> None:
    """A user error (data, cache, checkpoint, option) is one ``error:`` line and exit 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from blsam.checkpoint import CheckpointError
    from blsam.train.data import DataError
    from blsam.train.packed_cache import CacheError
    from blsam.utils.cli import OptionError
    from blsam.utils.config import ConfigError

    try:
        print(cache_teacher(args))
    except (CacheError, DataError, CheckpointError, OptionError, ConfigError, ValueError,
            FileNotFoundError) as e:  # user errors: exit 2
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"cache_teacher.py: error: {msg}", file=sys.stderr)
        raise SystemExit(2)
    finally:
        from blsam.utils.dist import cleanup

        cleanup()


if __name__ == "__main__":
    main(parse_args())
