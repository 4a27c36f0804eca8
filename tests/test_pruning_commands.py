"""The pruning baselines through the same commands as b_t: blsam-train (2 steps, exact resume,
SAM init from an official checkpoint) and blsam-eval on the tiny fixtures."""
from __future__ import annotations

import json
import os

import pytest
import torch
from eval_fixtures import make_tiny_dataset
from train_checks import assert_resume_matches_full, tiny_train_args

from blsam.checkpoint import read_state_dict
from blsam.train.tiny_sa1b import write_tiny_sa1b

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train_args(data, ckpt, out, *extra):
    return tiny_train_args("tiny_evit", data, ckpt, out, "--max-steps", "2", "--lr", "2e-4",
                           "--keep-ratio", "0.5", *extra)


def test_train_two_steps_and_resume_exactly(tiny_sam_ckpt, tmp_path):
    """2 steps straight == step 1's checkpoint resumed for 1 step; the result loads strictly
    as tiny_evit and the keep ratio is recorded."""
    from train_checks import train

    from blsam import blsam_model_registry

    data = tmp_path / "data"
    write_tiny_sa1b(data, num_shards=1, images_per_shard=2, size=96, fmt="tar")
    full = train(_train_args(data, tiny_sam_ckpt, tmp_path / "a", "--save-every", "1",
                             "--keep-last", "2"))
    step1 = tmp_path / "a" / "step_0000001.pth"
    resumed = train(_train_args(data, tiny_sam_ckpt, tmp_path / "b", "--resume", str(step1)))
    a = assert_resume_matches_full(tmp_path / "a", tmp_path / "b", full, resumed)
    init = read_state_dict(tiny_sam_ckpt)
    moved = [k for k in a if k.startswith("image_encoder.blocks.")
             and a[k].shape == init[k].shape and not torch.equal(a[k], init[k])]
    assert moved, "training changed no encoder weight"
    ck = torch.load(step1, weights_only=True)
    assert ck["config"]["model"] == "tiny_evit" and ck["config"]["keep_ratio"] == 0.5
    blsam_model_registry["tiny_evit"](checkpoint=tmp_path / "a" / "final.pth", img_size=64)


def test_eval_on_fixtures(tiny_sam_ckpt, tmp_path):
    from blsam.tools.zero_shot import main, parse_args

    d = make_tiny_dataset(str(tmp_path / "lvis"), "lvis", num_images=1)
    out = main(parse_args(["--model", "tiny_evit", "--sam-checkpoint", tiny_sam_ckpt,
                           "--img-size", "64", "--dataset", "lvis", "--ann-file", d["ann_file"],
                           "--img-dir", d["img_dir"], "--output", str(tmp_path / "out"),
                           "--no-progress", "--prompt", "box"]))
    res = out["results"][0]
    saved = json.load(open(res["outputs"]["json"]))
    assert saved["model"] == "tiny_evit" and saved["keep_ratio"] == 0.5
    assert saved["gflops"] > 0 and 0.0 <= res["metrics"]["mIoU"] <= 1.0


def test_benchmark_plans_the_baselines():
    from blsam.bench.models import model_specs

    specs = model_specs(["tiny"], [0.25], baselines=True)
    assert [s.name for s in specs][-2:] == ["tiny_evit@0.5", "tiny_evovit@0.5"]
    assert all(s.kind == "pruning" for s in specs[-2:])
    enc = specs[-1].build(64).image_encoder
    assert enc.method == "evovit" and enc.keep_ratio == 0.5
    assert [s.name for s in model_specs(["tiny"], [0.25])][-1] == "tiny_bl@0.25"
    steps = [s for s in model_specs(["b"], [0.25], ablation=True) if s.kind == "ablation"]
    assert [s.name for s in steps] == ["b_t_early_prune@0.25", "b_t_eblock@0.25",
                                       "b_t_predictor@0.25"]


@pytest.mark.slow  # a whole benchmark run (10 s on 2 shared cores)
def test_benchmark_times_the_baselines(tmp_path):
    from blsam.tools import benchmark

    args = benchmark.parse_args([
        "--img-size", "64", "--keep-ratios", "0.5", "--dtypes", "fp32", "--batch-sizes", "1",
        "--warmup", "0", "--repeats", "1", "--cpu-memory", "skip", "--gemm-rate", "skip",
        "--devices", "cpu", "--families", "tiny", "--malloc", "default", "--timm", "skip",
        "--isolation", "shared", "--baselines", "--output-dir", str(tmp_path)])
    results = {r.model: r for r in benchmark.main(args)}
    assert {"tiny_evit@0.5", "tiny_evovit@0.5"} <= set(results)
    for name in ("tiny_evit@0.5", "tiny_evovit@0.5"):
        r = results[name]
        assert r.error is None and r.kind == "pruning" and r.ratio_latency_vs_official > 0
        assert r.gflops_paper_sam < results["tiny_vit"].gflops_paper_sam
