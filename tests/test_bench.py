"""The benchmark package's own pieces: the one interleaved schedule, ratios, the typed config
a worker receives, the op classes of --profile-ops, and the autocast rows beside fp32/bf16."""
import json
import math

from blsam.bench.config import BenchConfig
from blsam.bench.profile import op_class
from blsam.bench.results import Result, relative_to
from blsam.bench.schedule import interleaved
from blsam.tools import benchmark
from blsam.utils.jobs import WorkerError


def test_interleaved_round_robin_drops_a_failing_item():
    calls, dropped = [], []

    def call(item):
        calls.append(item)
        if item == "b" and calls.count("b") == 2:
            raise WorkerError("died")

    live = interleaved(["a", "b", "c"], 3, call, lambda i, e: dropped.append(i))
    assert calls == ["a", "b", "c", "a", "b", "c", "a", "c"]
    assert live == ["a", "c"] and dropped == ["b"]


def test_relative_to_and_config_round_trip():
    r = Result("m", "tiny", "blsam", 0.5, "cpu", "fp32", 1, 1.0, 4.0, latency_ms_median=3.0)
    ref = Result("o", "tiny", "official", None, "cpu", "fp32", 1, 1.0, 8.0,
                 latency_ms_median=6.0)
    assert relative_to(r, ref) == 0.5 and relative_to(r, ref, "gflops_full_encoder") == 0.5
    assert math.isnan(relative_to(r, None))
    args = benchmark.parse_args(["--families", "tiny", "--cpu-dtypes", "fp32", "autocast",
                                 "--profile-ops"])
    cfg = benchmark.config(args)
    assert cfg.cpu_dtypes == ["fp32", "autocast"] and cfg.profile_ops
    assert BenchConfig.from_json(cfg.to_json()) == cfg


def test_op_classes():
    assert op_class("aten::addmm") == op_class("aten::bmm") == "gemm"
    assert op_class("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert op_class("aten::_softmax") == "attention"
    assert op_class("aten::gather") == op_class("aten::scatter_") == "gather/scatter"
    assert op_class("aten::copy_") == op_class("aten::cat") == "copy"
    assert op_class("aten::add") == op_class("aten::native_layer_norm") == "elementwise"


def test_benchmark_autocast_rows_and_op_profile(tmp_path):
    """fp32, bf16 and autocast rows in one run, with ratios to official per precision, the
    bf16 matmul rate for both bf16 kinds, the attention path field and the per-op table."""
    args = benchmark.parse_args([
        "--img-size", "64", "--keep-ratios", "0.5", "--cpu-dtypes", "fp32", "bf16",
        "autocast", "--batch-sizes", "1", "--warmup", "0", "--repeats", "1", "--cpu-memory",
        "skip", "--gemm-rate", "skip", "--devices", "cpu", "--families", "tiny", "--malloc",
        "default", "--isolation", "shared", "--timm", "skip", "--allow-emulated-bf16",
        "--profile-ops", "--output-dir", str(tmp_path)])
    results = benchmark.main(args)
    assert [(r.model, r.dtype) for r in results] == [
        (m, d) for m in ("tiny_vit", "tiny_vit_sdpa", "tiny_bl@0.5")
        for d in ("fp32", "bf16", "autocast")]
    assert all(r.error is None for r in results)
    assert all(r.ratio_latency_vs_official == 1.0 for r in results if r.kind == "official")
    for r in results:
        assert r.op_profile["gemm"] > 0 and r.op_profile["total"] >= r.op_profile["gemm"]
        if r.dtype != "fp32":
            assert r.bf16 in ("native", "emulated") and r.frac_of_gemm_rate > 0
    data = json.loads((tmp_path / "benchmark.json").read_text())
    assert data["environment"]["bf16_matmul_gmacs_per_s"] > 0
    assert all("attention_path" in r and "op_profile" in r for r in data["results"])
    md = (tmp_path / "benchmark.md").read_text()
    assert "Per-op profile" in md and "| tiny_bl@0.5 | autocast | default |" in md
