"""The benchmark package's own pieces: the one interleaved schedule, ratios, the typed config
a worker receives, the op classes of --profile-ops, and the autocast rows beside fp32/bf16."""
import json
import math

import pytest

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


@pytest.mark.slow  # worker processes per dtype (~11 s): the fast tier stays under 3 minutes
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


# ---------------------------------------------------------------- GPU residency (issue 27.7)


class _FakeProps:
    total_memory = 80 * 2**30  # an 80 GB card: the device's property faked, not the plan


def test_cuda_rows_run_in_waves_that_fit_and_once(monkeypatch):
    """``--families h --devices cuda`` with every dtype and batch size was 28 resident workers
    (~74 GiB of fp32 weights plus contexts): now waves under 90% of the card, each holding
    whole comparison groups; CUDA rows only under the last allocator setting."""
    import torch

    from blsam.bench import run as bench_run
    from blsam.bench.residency import CONTEXT_BYTES, USABLE, parameter_count, resident_bytes

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i=0: _FakeProps())
    cfg = BenchConfig(families=["h"], devices=["cuda"], dtypes=["fp32", "bf16"],
                      batch_sizes=[1, 4], keep_ratios=[0.25, 0.5, 0.75, 1.0], timm="skip")
    plan = bench_run._plan(cfg, "tuned", {}, cuda_rows=True)
    assert len(plan) == 24 and not bench_run._plan(cfg, "default", {}, cuda_rows=False)
    need = {id(e): resident_bytes(e.spec, 1024, e.dt, e.bs) for e in plan}
    assert sum(need.values()) > _FakeProps.total_memory  # all at once: out of memory
    waves = bench_run.waves(cfg, plan)
    assert sorted(id(e) for w in waves for e in w) == sorted(need)
    limit = USABLE * _FakeProps.total_memory
    for w in waves:
        assert sum(need[id(e)] for e in w) <= limit
    for g in {(e.dt, e.bs) for e in plan}:  # rows compared with each other share a wave
        members = [e for e in plan if (e.dt, e.bs) == g]
        if sum(need[id(e)] for e in members) <= limit:
            assert any(all(e in w for e in members) for w in waves), g
    assert all(e.res.wave is not None for e in plan)
    assert max(e.res.wave for e in plan) == len(waves) - 1 >= 1
    # hand arithmetic: official ViT-H, fp32, batch 1 at 1024² (64² tokens, 16 heads)
    official = next(e for e in plan if e.spec.kind == "official" and e.dt == "fp32"
                    and e.bs == 1)
    n, heads, dim = 64 * 64, 16, 1280
    params = parameter_count(official.spec, 1024)
    assert 630e6 < params < 640e6  # SAM ViT-H's image encoder: 637 M
    assert need[id(official)] == (CONTEXT_BYTES + 4 * params + 3 * heads * n * n * 4
                                  + n * dim * 4 * 8)


def test_a_group_that_cannot_fit_is_skipped_with_its_reason(monkeypatch):
    import torch

    from blsam.bench import run as bench_run

    class Small:
        total_memory = 8 * 2**30

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i=0: Small())
    cfg = BenchConfig(families=["h"], devices=["cuda"], dtypes=["fp32"], batch_sizes=[8],
                      keep_ratios=[0.25])
    plan = bench_run._plan(cfg, "tuned", {})
    waves = bench_run.waves(cfg, plan)
    assert all(e not in w for w in waves for e in plan if e.res.error)
    skipped = [e for e in plan if e.res.error]
    assert skipped and all("needs ~" in e.res.error and "GiB on cuda" in e.res.error
                           for e in skipped)
    assert any(e.spec.kind == "official" for e in skipped)  # 8 x 3 x 1 GiB of scores alone


def test_photo_and_end_to_end_rows_run_where_the_gpu_rows_do():
    """With CUDA among --devices the whole-SAM rows (SamPredictor, AMG) run on the GPU, where
    users run them; on a CPU-only run on the CPU."""
    from blsam.bench.photos import sam_variants

    on_gpu = sam_variants(BenchConfig(families=["tiny"], keep_ratios=[0.25],
                                      devices=["cpu", "cuda"]))
    assert len(on_gpu) == 3 and {v["device"] for v in on_gpu} == {"cuda"}
    on_cpu = sam_variants(BenchConfig(families=["tiny"], keep_ratios=[0.25], devices=["cpu"]))
    assert {v["device"] for v in on_cpu} == {"cpu"}


def test_rows_name_planned_rows_only(capsys):
    """``--rows`` takes any planned row (models, ORT rows) and refuses others in one line."""
    args = benchmark.parse_args(["--families", "b", "--onnx", "--timm", "skip",
                                 "--rows", "vit_b", "b_t@0.25[ort]"])
    assert args.rows == ["vit_b", "b_t@0.25[ort]"]
    with pytest.raises(SystemExit) as e:
        benchmark.parse_args(["--families", "b", "--rows", "vit_h"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--rows: vit_h not among" in err[0]
