"""Write tiny SA-1B-format shards (skimage photos, SLIC-segment masks as COCO RLE) for tests
and dry runs of tools/train.py without downloading SA-1B."""
from __future__ import annotations

import argparse
import sys

from blsam.train.tiny_sa1b import write_tiny_sa1b
from blsam.utils.cli import one_line_parse_errors, run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--output", required=True, help="folder to write shards / pairs into")
    p.add_argument("--format", default="tar", choices=("tar", "folder"))
    p.add_argument("--num-shards", type=int, default=2)
    p.add_argument("--images-per-shard", type=int, default=3)
    p.add_argument("--size", type=int, default=96, help="longest image side in pixels")
    p.add_argument("--masks-per-image", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    return one_line_parse_errors(p).parse_args(argv)


def main(args: argparse.Namespace) -> None:
    paths = write_tiny_sa1b(args.output, args.num_shards, args.images_per_shard, args.size,
                            args.masks_per_image, args.format, args.seed)
    print(f"wrote {len(paths)} {'shards' if args.format == 'tar' else 'images'} to {args.output}")


def cli(argv: list[str] | None = None) -> int:
    """``blsam-make-tiny-sa1b``: a user error is one ``error:`` line and exit 2."""
    return run_cli(lambda: main(parse_args(argv)), extra="train", argv=argv)


if __name__ == "__main__":
    sys.exit(cli())
