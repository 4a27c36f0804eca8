"""Shared script helpers: YAML configs as argparse defaults, atomic checkpoint writes."""
import argparse
import pickle

import pytest
import torch

from blsam.checkpoint import save_atomic
from blsam.utils.config import ConfigError, parse_args_with_config


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("--config")
    p.add_argument("--lr", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--amp", choices=["none", "bf16"], default="none")
    p.add_argument("--prompts", nargs="+", choices=["box", "point"], default=["box"])
    return p


def test_precedence_cli_over_config_over_default(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 0.5\nbatch-size: 8\nprompts: [box, point]\n")
    args = parse_args_with_config(_parser(), ["--config", str(cfg), "--lr", "0.1"])
    assert (args.lr, args.batch_size, args.amp) == (0.1, 8, "none")
    assert args.prompts == ["box", "point"]


@pytest.mark.parametrize("text, match", [
    ("lrr: 0.5\n", r"unknown key\(s\).*lrr \(did you mean 'lr'\?\)"),
    ("amp: fp8\n", "amp='fp8': 'fp8' is not one of"),
    ("prompts: [box, mask]\n", "'mask' is not one of"),
    ("- 1\n- 2\n", "must hold a mapping"),
    ("lr: [1\n", "not valid YAML"),
])
def test_bad_configs_fail_clearly(tmp_path, text, match):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=match):
        parse_args_with_config(_parser(), ["--config", str(cfg)])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        parse_args_with_config(_parser(), ["--config", str(tmp_path / "nope.yaml")])


def test_save_atomic_keeps_last_good_file(tmp_path):
    path = tmp_path / "ckpt" / "last.pth"
    save_atomic({"step": torch.tensor(1)}, path)
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        save_atomic({"bad": lambda: None}, path)  # cannot be pickled: fails mid-write
    assert torch.load(path, weights_only=True)["step"].item() == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pth"]  # no temp left
    save_atomic({"step": torch.tensor(2)}, path)
    assert torch.load(path, weights_only=True)["step"].item() == 2
