"""``Trainer``: the distillation run (paper §3.3, §4.1) from checked options to summary.

``Trainer(config).fit()`` reads top to bottom like torchtitan's ``train()``: set up data, models
and optimizer (``run.setup``), restore a checkpoint (``checkpointer.resume``), wrap in DDP,
step until done or stopped (``loop.run_loop``: logging, validation, checkpoints) and finish
(final weights, summary). ``train(config)`` is what ``blsam-train`` calls.
"""
from __future__ import annotations

from typing import Any

from . import loop, rundir
from .checkpointer import resume
from .cluster import StopSignals, signal_numbers
from .config import TrainConfig
from .metrics_log import MetricsLog
from .precision import deterministic_mode
from .preemption import check_grace_at_start, grace_seconds
from .run import setup, wrap_ddp


class Trainer:
    """Owns one run's parts (``run.Run``) from its checked configuration to the summary."""

    def __init__(self, config: TrainConfig) -> None:
        config.validate()  # before any data is indexed or model built
        self.config = config

    def fit(self) -> dict[str, Any]:
        """Run (or resume) the training, or ``--val-only``; returns rank 0's summary."""
        try:
            return self._fit()
        finally:  # the --output-dir lock (claimed in run._setup_data on rank 0)
            if self.config.ckpt.output_dir:
                rundir.release(self.config.ckpt.output_dir)

    def _fit(self) -> dict[str, Any]:
        # from here a preemption signal (or Ctrl-C) is a flag read at the next step boundary;
        # until the first step, nothing is lost by stopping at once (preemption.py)
        with StopSignals(signal_numbers(self.config.cluster.preempt_signals)) as signals, \
                deterministic_mode(self.config.cluster.deterministic):
            signals.in_setup = True
            run = setup(self.config)
            run.signals = signals
            if self.config.val.val_only:
                return loop.val_only(run)
            resume(run)
            wrap_ddp(run)
            if run.info.is_main:  # does a checkpoint write fit the preemption grace?
                check_grace_at_start(self.config.ckpt.output_dir, run.sam,
                                     grace_seconds(self.config.cluster.preempt_grace))
            signals.in_setup = False
            mlog = MetricsLog(run)
            try:
                completed = loop.run_loop(run, mlog)
            finally:
                mlog.close()
            return loop.finish(run, completed)


def train(config: TrainConfig) -> dict[str, Any]:
    """Run (or resume) a distillation run, or ``--val-only``; returns rank 0's summary."""
    return Trainer(config).fit()
