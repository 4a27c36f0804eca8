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


def _typed_parser() -> argparse.ArgumentParser:
    p = _parser()
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--betas", type=float, nargs=2, default=[0.9, 0.999])
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--name", default=None)
    return p


@pytest.mark.parametrize("text, match", [
    ("seed: 1.5\n", r"seed=1\.5: an integer expected"),  # was truncated, or a traceback
    ("betas: 0.9\n", "betas: needs 2 values, got 1"),
    ("batch_size: true\n", "batch_size=True: an integer expected"),  # was batch 1
    ("no_progress: 'false'\n", "no_progress='false': an on/off flag takes true or false"),
    ("lr: [1, 2]\n", r"lr=\[1, 2\]: one value expected, not a list"),
    ("lr: {a: 1}\n", "one value expected, not a mapping"),
    ("name: yes\n", "a string expected"),
    ("lr: fast\n", "lr='fast': a number expected"),
    ("a: &a [x, x]\nb: &b [*a, *a]\nlr: *b\n", "uses YAML aliases"),
])
def test_config_values_are_typed_like_the_command_line(tmp_path, text, match):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=match) as e:
        parse_args_with_config(_typed_parser(), ["--config", str(cfg)])
    assert len(str(e.value)) < 400 and "\n" not in str(e.value)


def test_config_values_converted_and_size_limited(tmp_path):
    from blsam.utils.config import MAX_CONFIG_BYTES

    cfg = tmp_path / "c.yaml"
    cfg.write_text("seed: '7'\nlr: 1e-4\nbetas: [0.5, 0.6]\nno_progress: true\nname: 12\n"
                   "prompts: point\n")
    args = parse_args_with_config(_typed_parser(), ["--config", str(cfg)])
    assert (args.seed, args.lr, args.betas, args.no_progress, args.name) == (
        7, 1e-4, [0.5, 0.6], True, "12")
    assert args.prompts == "point"  # a single value for a list option, as before
    cfg.write_text("seed: 1\n" + "#" * MAX_CONFIG_BYTES)
    with pytest.raises(ConfigError, match="more than the"):
        parse_args_with_config(_typed_parser(), ["--config", str(cfg)])


def test_every_tool_prints_its_config_and_takes_it_back(tmp_path, capsys):
    """``--print-config``: what the tool would run with, as YAML that ``--config`` reads."""
    import yaml

    from blsam.tools.train import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(["--config", "distill_b_t", "--lr", "0.5", "--print-config"])
    assert e.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"] == "b_t" and printed["lr"] == 0.5 and "print_config" not in printed
    (tmp_path / "printed.yaml").write_text(yaml.safe_dump(printed))
    again = vars(parse_args(["--config", str(tmp_path / "printed.yaml")]))
    assert {k: v for k, v in again.items() if k != "config"} == printed
    from blsam.tools.specs import cli as specs_main

    assert specs_main(["b_t", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["model"] == "b_t"


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
