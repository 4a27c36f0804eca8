"""Every precision SAM accepts: whole-model bf16/fp16 casts and autocast, through SamPredictor."""
from __future__ import annotations

import pytest
import torch
from segment_anything import SamPredictor

from blsam import blsam_model_registry
from blsam.testing import randomize_

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(scope="module")
def b_t_and_reference(photo):
    """A random b_t at 256 px with live fusion, and its fp32 features of the real photo.

    keep 0.6 routes pad slots in the short windows of the 16x16 grid, so the pad-slot fusion
    path runs in every precision too."""
    torch.manual_seed(0)
    sam = blsam_model_registry["tiny_bl"](img_size=256, keep_ratio=0.6)
    randomize_(sam, seed=1, fusion=True)
    predictor = SamPredictor(sam.eval())
    predictor.set_image(photo)
    return sam, predictor.features.clone()


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.float().flatten(), b.flatten(), dim=0).item()


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_whole_model_cast_runs_sam_predictor(name, b_t_and_reference, photo):
    """``sam.to(torch.bfloat16)`` (segment-anything-fast does it) must run like official SAM."""
    sam, ref = b_t_and_reference
    dtype = DTYPES[name]
    cast = blsam_model_registry["tiny_bl"](img_size=256, keep_ratio=0.6)
    cast.load_state_dict(sam.state_dict())
    cast.eval().to(dtype)
    predictor = SamPredictor(cast)
    predictor.set_image(photo)
    assert predictor.features.dtype == dtype
    assert torch.isfinite(predictor.features.float()).all()
    assert _cos(predictor.features, ref) >= 0.98
    for stage in cast.image_encoder.last_routing:  # the token predictor still scores in fp32
        assert stage["scores"].dtype == torch.float32


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_autocast_runs_sam_predictor(name, b_t_and_reference, photo):
    sam, ref = b_t_and_reference
    predictor = SamPredictor(sam)
    with torch.autocast("cpu", dtype=DTYPES[name]):
        predictor.set_image(photo)
    assert _cos(predictor.features, ref) >= 0.98
    assert all(s["scores"].dtype == torch.float32 for s in sam.image_encoder.last_routing)
