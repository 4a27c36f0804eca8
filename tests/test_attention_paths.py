"""Attention paths: fused SDPA and batched bmm give the same model, the rule picks by device and
dtype (faking the CPU's AMX flag, not the rule), and the ONNX export kernel is scoped."""
from __future__ import annotations

import pytest
import torch

from blsam.build_blsam import build_model
from blsam.modeling import attention
from blsam.modeling.attention import attention_path, use_attention_path
from blsam.testing import randomize_

MODELS = ["tiny_bl", "tiny_vit", "tiny_evit", "tiny_evovit", "tiny_bl_early_prune",
          "tiny_bl_predictor"]


def _encoder(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    enc = build_model(name, img_size=128).image_encoder
    return randomize_(enc, seed=1, fusion=True).eval()


@pytest.mark.parametrize("name", MODELS)
def test_paths_agree_fp32_inference(name):
    enc = _encoder(name)
    x = torch.randn(1, 3, 128, 128)
    with torch.inference_mode():
        with use_attention_path("sdpa"):
            ref = enc(x)
        with use_attention_path("bmm"):
            out = enc(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_paths_agree_bf16():
    enc = _encoder("tiny_bl").to(torch.bfloat16)
    x = torch.randn(1, 3, 128, 128, dtype=torch.bfloat16)
    with torch.inference_mode():
        with use_attention_path("sdpa"):
            ref = enc(x).float()
        with use_attention_path("bmm"):
            out = enc(x).float()
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()


def test_paths_agree_in_training_gradients():
    enc = _encoder("tiny_bl").train()
    x = torch.randn(2, 3, 128, 128)
    grads = {}
    for path in ("sdpa", "bmm"):
        enc.zero_grad()
        with use_attention_path(path):
            enc(x).square().mean().backward()
        grads[path] = {n: p.grad.clone() for n, p in enc.named_parameters()
                       if p.grad is not None}
    assert grads["sdpa"].keys() == grads["bmm"].keys()
    for n, g in grads["sdpa"].items():
        torch.testing.assert_close(grads["bmm"][n], g, atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("amx, dtype, device, want", [
    (False, torch.bfloat16, "cpu", "bmm"),   # AVX512-BF16 without AMX: SDPA does not speed up
    (True, torch.bfloat16, "cpu", "sdpa"),   # AMX: SDPA's bf16 kernel wins
    (False, torch.float32, "cpu", "sdpa"),
    (False, torch.bfloat16, "cuda", "sdpa"),
    (False, torch.float32, "meta", "sdpa"),  # FLOP counting decomposes SDPA
])
def test_rule(monkeypatch, amx, dtype, device, want):
    monkeypatch.delenv("BLSAM_ATTENTION", raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert attention_path(device, dtype) == want


def test_forced_path_and_bad_values(monkeypatch):
    monkeypatch.setenv("BLSAM_ATTENTION", "bmm")
    assert attention_path("cpu", torch.float32) == "bmm"
    with use_attention_path("sdpa"):
        assert attention_path("cpu", torch.float32) == "sdpa"
    monkeypatch.setenv("BLSAM_ATTENTION", "flash")
    with pytest.raises(ValueError, match="BLSAM_ATTENTION"):
        attention_path("cpu", torch.float32)
    with pytest.raises(ValueError, match="attention path"):
        with use_attention_path("fast"):
            pass


def test_export_kernel_is_scoped():
    from blsam.utils.onnx import attend_folded, attend_fused, export_attention

    assert attention.export_kernel() is attend_fused  # the exporter's default
    with export_attention(fused=False):
        assert attention.export_kernel() is attend_folded
    assert attention.export_kernel() is attend_fused
