"""Print the per-layer summary of a model, its paper-convention GFLOPs, or the GFLOPs table
of every model beside the paper's Table 2 (``blsam.spec_tables``).

    blsam-specs b_t
    blsam-specs h_b --img-size 512 --keep-ratio 0.5 --flops
    blsam-specs --table
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from blsam.spec_tables import gflops_table, layer_table, paper_gflops
from blsam.specs import MODEL_SPECS
from blsam.utils.cli import OptionError, one_line_parse_errors, run_cli


def cli(argv: Sequence[str] | None = None) -> int:
    """``blsam-specs``: the one CLI path of every tool (one ``error:`` line, exit 2)."""
    p = one_line_parse_errors(argparse.ArgumentParser(
        description="print the per-layer summary of a model"))
    p.add_argument("model", nargs="?", choices=sorted(MODEL_SPECS), help="default: all")
    p.add_argument("--img-size", type=int, default=1024)
    p.add_argument("--keep-ratio", type=float, default=None,
                   help="default: the model's (0.25 bLViT, 0.5 pruning baselines)")
    p.add_argument("--flops", action="store_true",
                   help="also count paper-convention GFLOPs (SAM with one point prompt, counted "
                        "on the meta device)")
    p.add_argument("--table", action="store_true",
                   help="one Markdown table: every model's paper-convention GFLOPs (default "
                        "keep ratios) ordered by GFLOPs, the paper's Table 2 numbers beside")

    def body() -> int:
        args = p.parse_args(argv)
        try:
            if args.table:
                print(gflops_table([args.model] if args.model else None, args.img_size))
                return 0
            names = [args.model] if args.model else list(MODEL_SPECS)
            tables = [layer_table(n, args.img_size, args.keep_ratio) for n in names]
            if args.flops:
                tables = [t + f"\nGFLOPs (paper convention): "
                          f"{paper_gflops(n, args.img_size, args.keep_ratio):.1f}"
                          for t, n in zip(tables, names)]
        except ValueError as e:  # a bad --img-size / --keep-ratio for this model
            raise OptionError(str(e)) from None
        print("\n\n".join(tables))
        return 0

    return run_cli(body, argv=argv)


if __name__ == "__main__":
    sys.exit(cli())
