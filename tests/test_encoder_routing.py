"""keep_ratio means the routed share of real tokens; padding-aware routing (opt-in)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor

from blsam import blsam_model_registry, build_vanilla_sam
from blsam.modeling import route_tokens, tokens_per_window
from blsam.testing import randomize_

KEEPS = [0.05, 0.25, 0.5, 0.6, 0.75, 0.9, 0.99]


def _real_per_window(h: int, w: int, ws: int = 14):
    return [min(ws, h - i) * min(ws, w - j) for i in range(0, h, ws) for j in range(0, w, ws)]


@pytest.mark.parametrize("grid", [(4, 4), (14, 14), (16, 16), (20, 20), (28, 28), (40, 40),
                                  (64, 64), (64, 48), (36, 64)])
def test_keep_ratio_is_the_routed_share_of_real_tokens(grid):
    """Routed real tokens = keep * N_real, up to less than one token per window, with one k
    for every window, the smallest that reaches the budget."""
    h, w = grid
    n, counts = h * w, _real_per_window(h, w)
    for keep in KEEPS:
        r = route_tokens(torch.rand(2, h, w), keep, 14)
        routed = r.mask.flatten(1).sum(1).float()
        assert (routed >= keep * n - 1e-6).all(), (grid, keep, routed)
        assert (routed < keep * n + len(counts)).all(), (grid, keep, routed)
        assert torch.allclose(r.share, routed / n)
        k = r.k
        assert k == tokens_per_window(keep, grid, 14)
        assert k == 1 or sum(min(k - 1, c) for c in counts) < keep * n - 1e-6  # smallest k
    assert route_tokens(torch.rand(1, h, w), 1.0, 14).mask.all()


def test_encoder_reports_achieved_share():
    enc = blsam_model_registry["tiny_bl"](img_size=256, keep_ratio=0.25).image_encoder
    with torch.no_grad():
        enc(torch.randn(2, 3, 256, 256))
    for stage in enc.last_routing:
        assert stage["share"].shape == (2,)
        assert torch.allclose(stage["share"], stage["mask"].flatten(1).float().mean(1))
        assert (stage["share"] >= 0.25).all() and (stage["share"] < 0.25 + 4 / 256).all()
        assert stage["skip_padding"] is False


def _photo(aspect: str) -> np.ndarray:
    from blsam.testing import real_photo

    img = real_photo()  # 512x512
    h = {"1:1": 512, "4:3": 384, "16:9": 288}[aspect]
    return np.ascontiguousarray(img[(512 - h) // 2:(512 - h) // 2 + h])


@pytest.fixture(scope="module")
def b_t_256():
    torch.manual_seed(0)
    sam = blsam_model_registry["tiny_bl"](img_size=256, keep_ratio=0.25)
    return randomize_(sam, seed=2, fusion=True).eval()


@pytest.mark.parametrize("aspect", ["4:3", "16:9"])
def test_skip_padding_routes_only_content(aspect, b_t_256):
    enc = b_t_256.image_encoder
    predictor = SamPredictor(b_t_256)
    image = _photo(aspect)
    rows = math.ceil(round(image.shape[0] * 256 / image.shape[1]) / 16)  # tokens with content
    content = torch.zeros(16, 16, dtype=torch.bool)
    content[:rows] = True
    try:
        predictor.set_image(image)
        paper = [s["mask"][0].clone() for s in enc.last_routing]
        enc.skip_padding = True
        predictor.set_image(image)
    finally:
        enc.skip_padding = False
    assert any((m & ~content).any() for m in paper)  # the paper's routing spends on padding
    for stage in enc.last_routing:
        m = stage["mask"][0]
        assert not (m & ~content).any()
        n = int(content.sum())
        assert 0.25 * n <= m.sum() < 0.25 * n + 4 and stage["skip_padding"] is True


def test_skip_padding_batches_aspect_ratios(b_t_256):
    enc = b_t_256.image_encoder
    x = torch.randn(3, 3, 256, 256)
    x[0, :, 200:] = 0  # landscape padding
    x[1, :, :, 120:] = 0  # portrait padding
    enc.skip_padding = True
    try:
        with torch.no_grad():
            batched = enc(x)
            masks = [s["mask"] for s in enc.last_routing]
            for i in range(3):
                single = enc(x[i:i + 1])
                assert (single - batched[i:i + 1]).abs().max().item() < 1e-4
                for m_b, s in zip(masks, enc.last_routing):
                    assert torch.equal(m_b[i], s["mask"][0])
    finally:
        enc.skip_padding = False
    assert not masks[0][0, 13:].any() and not masks[0][1, :, 8:].any()


def test_skip_padding_keep_all_equals_sam(tiny_sam_ckpt):
    ref = build_vanilla_sam("tiny_vit", tiny_sam_ckpt, img_size=224).image_encoder
    enc = blsam_model_registry["tiny_bl"](sam_checkpoint=tiny_sam_ckpt, keep_ratio=1.0,
                                      img_size=224, skip_padding=True).image_encoder
    assert enc.skip_padding is True
    with torch.no_grad():
        for n, p in enc.named_parameters():
            if "gamma" in n or "alpha" in n:
                p.zero_()
    x = torch.randn(1, 3, 224, 224)
    x[..., 150:] = 0
    with torch.no_grad():
        assert (enc(x) - ref(x)).abs().max().item() <= 1e-4
    with pytest.raises(TypeError, match="skip_padding"):
        enc.skip_padding = 1
