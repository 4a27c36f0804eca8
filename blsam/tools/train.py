"""Distil a bLViT-SAM student from vanilla SAM on SA-1B (single process or torchrun DDP).

    python tools/train.py --config configs/distill_b_t.yaml --data /data/sa1b \
        --sam-checkpoint sam_vit_b_01ec64.pth --output-dir runs/b_t
    torchrun --nproc_per_node 8 tools/train.py --config configs/distill_h_b.yaml ...
    python tools/train.py ... --resume auto
    python tools/train.py --config ... --val-only --checkpoint runs/b_t/final.pth

A user error (bad option, data, teacher cache, checkpoint, resume, output folder, ranks that
disagree) is one ``error:`` line on stderr and exit code 2, never a traceback. Exit codes: 0
done (or --stop-after), 2 user error, 3 too many non-finite steps (one line naming the step and
the newest good checkpoint), 75 stopped by SIGTERM/SIGUSR1/SIGINT with a checkpoint written
(rerun with --resume auto) or, before the first step, at once (nothing to save), 130 a second
Ctrl-C (no checkpoint), 1 a failure of one rank's own work (a checkpoint write, metrics.jsonl,
the profiler trace) that every rank learnt at the same step boundary (one line naming the
rank), or a crash (traceback). The process group is destroyed only after an exit every rank
agreed on (blsam.train.failures).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from blsam.errors import UserError
from blsam.train import fatal
from blsam.train.cluster import EXIT_INTERRUPTED, EXIT_NONFINITE, EXIT_PREEMPTED, NonFiniteError
from blsam.train.config import TrainConfig
from blsam.train.failures import EXIT_FAILED, RankFailure, agreed_exit, end_process_group
from blsam.train.options import build_parser
from blsam.train.preemption import PreemptedDuringSetup
from blsam.train.trainer import train
from blsam.utils.cli import one_line, one_line_parse_errors, run_cli
from blsam.utils.config import parse_args_with_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return parse_args_with_config(one_line_parse_errors(build_parser()), argv)


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """The typed options of ``argv`` (config file and command line applied), not yet checked
    (``TrainConfig.validate``, run by the trainer)."""
    return TrainConfig.from_options(vars(parse_args(argv)))


def main(config: TrainConfig) -> int:
    """Train; the exit code: 0, or EXIT_PREEMPTED when a signal stopped the run."""
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    out = train(config)
    if config.val.val_only and rank == 0:
        print(json.dumps(out))
    return EXIT_PREEMPTED if out.get("preempted") else 0


def _error(e: BaseException) -> None:
    if not getattr(e, "printed", False):
        sys.stderr.write(f"error: {one_line(e)}\n")  # one write: ranks sharing a pipe
        sys.stderr.flush()
        e.printed = True  # type: ignore[attr-defined]


def cli(argv: list[str] | None = None) -> int:
    """Command-line entry (``blsam-train``): a user error is one ``error:`` line and exit 2;
    too many non-finite steps exit 3; a second Ctrl-C exits 130 (docs/training.md)."""

    def body() -> int:
        exc: BaseException | None = None
        try:
            return main(parse_config(argv))
        except NonFiniteError as e:
            exc = e
            _error(e)
            return EXIT_NONFINITE
        except RankFailure as e:
            exc = e
            _error(e)
            return EXIT_FAILED
        except PreemptedDuringSetup as e:  # nothing to save: out at once, 75 (retry)
            exc = e
            sys.stderr.write(f"stopped: {e}\n")
            return EXIT_PREEMPTED
        except KeyboardInterrupt as e:
            exc = e
            print("error: interrupted (a second Ctrl-C): no checkpoint written for the steps "
                  "since the last save", file=sys.stderr)
            return EXIT_INTERRUPTED
        except BaseException as e:
            exc = e
            if isinstance(e, (UserError, FileNotFoundError)) and agreed_exit(e):
                _error(e)  # printed before the others may exit (torchrun stops them)
            raise
        finally:  # every rank printed its line: now the agreed ones leave together
            end_process_group(agreed_exit(exc))

    # a deterministic failure of an earlier torchrun attempt is not retried (train.fatal)
    return fatal.guarded(lambda: run_cli(body, extra="train", argv=argv))


if __name__ == "__main__":
    sys.exit(cli())
