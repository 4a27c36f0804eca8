"""Assertions shared by the training tests (resume equals an uninterrupted run)."""
from __future__ import annotations

import os

import pytest
import torch

from blsam.checkpoint import read_state_dict


def assert_resume_matches_full(dir_full: os.PathLike, dir_resumed: os.PathLike,
                               full: dict, resumed: dict) -> dict:
    """The resumed run's final weights equal the uninterrupted run's, and its losses continue
    the uninterrupted run's history after its first step. Returns the full run's weights."""
    a = read_state_dict(os.path.join(dir_full, "final.pth"))
    b = read_state_dict(os.path.join(dir_resumed, "final.pth"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)
    assert [h["loss"] for h in full["history"][1:]] == pytest.approx(
        [h["loss"] for h in resumed["history"]], abs=1e-5)
    return a


def train(args):
    """``blsam.train.trainer.train`` of the typed config of ``args`` (a parsed Namespace)."""
    from blsam.train.config import TrainConfig
    from blsam.train.trainer import train as run_training

    return run_training(TrainConfig.from_options(vars(args)))


def tiny_train_args(model: str, data: os.PathLike, ckpt: str, out: os.PathLike, *extra: str):
    """blsam-train options of the 1-2 step runs on tiny shards (64 px, batch 1, box prompts)."""
    from blsam.tools.train import parse_args

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return parse_args([
        "--config", os.path.join(root, "configs", "distill_b_t.yaml"), "--model", model,
        "--data", str(data), "--data-fraction", "1", "--sam-checkpoint", ckpt,
        "--output-dir", str(out), "--img-size", "64", "--batch-size", "1", "--num-workers", "0",
        "--log-every", "1", "--warmup-steps", "0", "--no-progress", "--val-every", "0",
        "--masks-per-image", "2", "--prompt-types", "box", *extra])
