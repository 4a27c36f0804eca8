"""A benchmark worker process: ``python -m blsam.bench.workers --serve JOB CONFIG``.

JOB is one job as JSON (``kind``: encoder, gemm, sam, memory or sweep, see
``blsam.bench.jobs``), CONFIG the run's ``BenchConfig`` as JSON. The process builds the job,
replies with its ``hello`` and answers one command per stdin line (``blsam.utils.jobs``'s
protocol) until ``quit``. The parent starts it through ``blsam.bench.jobs.start_job``.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys

from blsam.utils.jobs import serve

from .config import BenchConfig
from .jobs import make_job


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m blsam.bench.workers",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--serve", required=True, metavar="JOB", help="the job, as JSON")
    p.add_argument("config", help="the run's BenchConfig, as JSON")
    args = p.parse_args(argv)
    cfg = BenchConfig.from_json(args.config)
    import torch

    torch.set_num_threads(cfg.threads)
    return serve(json.loads(args.serve), functools.partial(make_job, cfg))


if __name__ == "__main__":
    sys.exit(main())
