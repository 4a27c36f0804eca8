"""The console scripts setup.py declares resolve to callables, run, and refuse bad options with
one line and exit 2; the architecture spec drives the registry and every model table."""
from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata

import pytest

SCRIPTS = ("blsam-train", "blsam-eval", "blsam-cache-teacher", "blsam-routing", "blsam-demo",
           "blsam-benchmark", "blsam-export-onnx",
           "blsam-specs")


def _entry_points():
    return {ep.name: ep for ep in metadata.entry_points(group="console_scripts")
            if ep.name.startswith("blsam-")}


def test_console_scripts_resolve():
    eps = _entry_points()
    if not eps:
        pytest.skip("blsam is not pip-installed in this environment")
    assert set(SCRIPTS) <= set(eps)
    for ep in eps.values():
        assert callable(ep.load()), ep.name


@pytest.mark.parametrize("argv, code, text", [
    (["blsam-specs", "tiny_bl", "--img-size", "256"], 0, "big_little"),
    # the other two start a fresh interpreter each (~5 s): slow tier
    pytest.param(["blsam-train", "--img-size", "65", "--data", "x", "--sam-checkpoint", "y"], 2,
                 "error:", marks=pytest.mark.slow),
    pytest.param(["blsam-eval", "--no-such-flag"], 2, "error:", marks=pytest.mark.slow),
])
def test_console_scripts_run(argv, code, text):
    exe = os.path.join(os.path.dirname(sys.executable), argv[0])
    if not os.path.exists(exe):
        pytest.skip(f"{argv[0]} is not installed next to {sys.executable}")
    proc = subprocess.run([exe, *argv[1:]], capture_output=True, text=True, timeout=120)
    assert proc.returncode == code, proc.stderr
    out = proc.stdout if code == 0 else proc.stderr
    assert text in out and "Traceback" not in proc.stderr
    if code:
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_every_model_table_derives_from_the_spec():
    from blsam import blsam_model_registry
    from blsam.checkpoint import SAM_ENCODER_NAMES
    from blsam.specs import (
        BLVIT_MODELS,
        DISPLAY_NAMES,
        FAMILIES,
        MODEL_SPECS,
        PRUNING_MODELS,
        TEACHER_OF,
    )
    from blsam.tools import zero_shot
    from blsam.train.options import build_parser

    assert set(blsam_model_registry) == set(MODEL_SPECS) | {"default"}
    assert set(zero_shot.MODELS) == set(MODEL_SPECS) and set(zero_shot.BLVIT) == set(BLVIT_MODELS)
    students = set(BLVIT_MODELS) | set(PRUNING_MODELS)  # bLViT and the pruning baselines train
    assert set(TEACHER_OF) == students and set(DISPLAY_NAMES) == set(MODEL_SPECS)
    # the Table-3 design steps are not benchmark families (b_t stays family 'b')
    assert {s for _, s in FAMILIES.values()} == {
        m for m in BLVIT_MODELS if not MODEL_SPECS[m].ablation_of}
    assert sorted(SAM_ENCODER_NAMES.values()) == sorted(
        s.display_name for s in MODEL_SPECS.values() if s.teacher is None)
    model_opt = next(a for a in build_parser()._actions if a.dest == "model")
    assert set(model_opt.choices) == students


def test_spec_checks_and_layer_table():
    from blsam.spec_tables import layer_table
    from blsam.specs import check_img_size, check_keep_ratio, get_spec

    assert get_spec("default").name == "h_b"
    with pytest.raises(KeyError, match="choose from"):
        get_spec("vit_x")
    for bad in (0, -0.5, 1.01, float("nan"), True, "0.5"):
        with pytest.raises(ValueError):
            check_keep_ratio(bad)
    for bad in (0, 8, 100, 1024.0, True):
        with pytest.raises(ValueError):
            check_img_size(bad)
    table = layer_table("h_b")
    assert len(table.splitlines()) == 3 + 32 and "k = 41 of 196" in table
    assert table.count("p_only") == 11 and table.count("big_little") == 12
