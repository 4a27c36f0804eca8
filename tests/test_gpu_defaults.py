"""GPU defaults: tools/benchmark.py runs only the rows of the devices the node has (CUDA alone on
a GPU node) unless --devices says otherwise; eval/zero_shot.py --amp bf16 is recorded, labelled
apart from fp32 runs, and stays close to fp32 on the test fixtures."""
import torch
from eval_fixtures import make_tiny_dataset

import blsam.tools.zero_shot as zero_shot
from blsam.tools import benchmark


def test_benchmark_default_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert benchmark.default_devices() == ["cuda"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert benchmark.default_devices() == ["cpu"]
    assert benchmark.parse_args(["--devices", "cpu", "cuda"]).devices == ["cpu", "cuda"]


def test_eval_bf16_recorded_and_close_to_fp32(tiny_sam_ckpt, tmp_path):
    d = make_tiny_dataset(str(tmp_path / "data"), "coco", num_images=2)
    out = {}
    for amp in ("fp32", "bf16"):
        argv = ["--model", "tiny_vit", "--checkpoint", tiny_sam_ckpt, "--img-size", "64",
                "--dataset", "coco", "--ann-file", d["ann_file"], "--img-dir", d["img_dir"],
                "--output", str(tmp_path / "out"), "--no-progress", "--no-flops",
                "--prompt", "point1", "box", "--amp", amp]
        out[amp] = {r["protocol"]["name"]: r for r in
                    zero_shot.main(zero_shot.parse_args(argv))["results"]}
    for name in ("point1", "box"):
        a, b = out["fp32"][name], out["bf16"][name]
        assert a["amp"] == "fp32" and b["amp"] == "bf16" and b["config"]["amp"] == "bf16"
        assert b["outputs"]["json"].endswith("_bf16.json") and a["outputs"]["json"] != \
            b["outputs"]["json"]
        assert abs(a["metrics"]["mIoU"] - b["metrics"]["mIoU"]) < 0.05, (a["metrics"],
                                                                        b["metrics"])
