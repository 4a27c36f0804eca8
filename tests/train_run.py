"""Run a training from parsed ``blsam-train`` options (the tests build them with parse_args)."""
from __future__ import annotations


def train(args):
    """``blsam.train.trainer.train`` of the typed config of ``args`` (a parsed Namespace)."""
    from blsam.train.config import TrainConfig
    from blsam.train.trainer import train as run_training

    return run_training(TrainConfig.from_options(vars(args)))
