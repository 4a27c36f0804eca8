"""bLViT encoder: parity with SAM, routing invariants, gradients, input validation."""
from __future__ import annotations

import math
import sys

import pytest
import torch

from blsam import blsam_model_registry, build_vanilla_sam, get_spec
from blsam.modeling import Attention, route_tokens, tokens_per_window
from blsam.testing import (
    assert_gradient_reaches_every_parameter,
    randomize_,
    save_random_sam_checkpoint,
)

SPECS = {  # variant -> (P-blocks, E-blocks, predictors, teacher, predictors after layers)
    "tiny_bl": (6, 2, 2, "tiny_vit", [2, 4]),
    "b_t": (12, 11, 4, "vit_b", [1, 4, 7, 10]),
    "h_b": (32, 12, 3, "vit_h", [8, 16, 24]),
}
FULL_WIDTH = [pytest.param(v, marks=pytest.mark.slow) for v in ("b_t", "h_b")]


@pytest.fixture(scope="module")
def sam_vit_h_ckpt(tmp_path_factory) -> str:
    return save_random_sam_checkpoint("vit_h", tmp_path_factory.mktemp("h") / "sam_h.pth", seed=1)


_CKPT_FIXTURE = {"tiny_bl": "tiny_sam_ckpt", "b_t": "sam_vit_b_ckpt", "h_b": "sam_vit_h_ckpt"}


def _zero_fusion_(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "gamma" in n or "alpha" in n:
                p.zero_()


@pytest.mark.parametrize("variant", ["tiny_bl", *FULL_WIDTH])
def test_keep_all_matches_official_sam(variant, request):
    """keep_ratio=1, gamma=alpha=0: every token takes the P path, so the encoder must equal
    segment_anything's ImageEncoderViT loaded from the same checkpoint."""
    ckpt = request.getfixturevalue(_CKPT_FIXTURE[variant])
    img = 256 if variant == "h_b" else 224  # 16 and 14 tokens: padded windows either way
    ref = build_vanilla_sam(SPECS[variant][3], ckpt, img_size=img).image_encoder
    sam = blsam_model_registry[variant](sam_checkpoint=ckpt, keep_ratio=1.0, img_size=img)
    enc = sam.image_encoder
    # E-blocks do work, but gamma=0 must hide it
    randomize_(enc, seed=3, fusion=True, positions=False)
    _zero_fusion_(enc)
    for n, p in enc.named_parameters():  # randomize_ must not have touched SAM's weights
        if "pos" in n and "e_block" not in n:
            assert torch.equal(p, ref.state_dict()[n]), n
    x = torch.randn(2, 3, img, img)
    with torch.no_grad():
        y_ref, y = ref(x), enc(x)
    assert y.shape == (2, 256, img // 16, img // 16)
    assert (y - y_ref).abs().max().item() <= 1e-4
    # and the fusion really is live: a nonzero gamma changes the output
    with torch.no_grad():
        enc.blocks[-1].gamma_mlp.fill_(0.5)
        assert (enc(x) - y_ref).abs().max().item() > 1e-3


@pytest.mark.parametrize("variant", ["tiny_vit", pytest.param("vit_b", marks=pytest.mark.slow)])
def test_fused_vanilla_matches_official(variant, request):
    ckpt = request.getfixturevalue("tiny_sam_ckpt" if variant == "tiny_vit" else "sam_vit_b_ckpt")
    ref = build_vanilla_sam(variant, ckpt, img_size=256).image_encoder
    ours = build_vanilla_sam(variant, ckpt, img_size=256, fused=True).image_encoder
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("grid", [(14, 14), (16, 16)])
def test_semi_cross_attention_equals_rows_of_full_attention(grid):
    """Queries at arbitrary positions must see the same keys and rel-pos bias as in SAM."""
    from segment_anything.modeling.image_encoder import Attention as SamAttention

    torch.manual_seed(1)
    sam_attn = SamAttention(64, num_heads=4, use_rel_pos=True, input_size=grid)
    ours = Attention(64, 4, grid)
    randomize_(sam_attn)
    ours.load_state_dict(sam_attn.state_dict())
    x = torch.randn(2, *grid, 64)
    with torch.no_grad():
        full = sam_attn(x).flatten(1, 2)
        idx = torch.stack([torch.randperm(grid[0] * grid[1])[:17] for _ in range(2)])
        semi = ours.forward_semi(x, idx, idx // grid[1], idx % grid[1], window_size=0)
        assert torch.allclose(ours(x).flatten(1, 2), full, atol=1e-5)
    expected = full.gather(1, idx.unsqueeze(-1).expand(-1, -1, 64))
    assert (semi - expected).abs().max().item() < 1e-5


def test_shared_bias_workspace_equals_fresh_buffers():
    """Inference reuses one rel-pos bias buffer for every layer (P and E, window and global):
    outputs must equal those computed without the workspace, whatever the order of shapes."""
    torch.manual_seed(2)
    grid = (16, 16)
    layers = [Attention(64, 4, grid), Attention(32, 2, grid, in_dim=64, out_dim=64),
              Attention(64, 4, (14, 14))]
    for m in layers:
        randomize_(m)
    x = torch.randn(1, *grid, 64)
    idx = torch.randperm(256)[:40].unsqueeze(0)
    calls = [lambda m=layers[0], ws=None: m(x, 0, ws),
             lambda m=layers[1], ws=None: m(x, 0, ws),
             lambda m=layers[0], ws=None: m.forward_semi(x, idx, idx // 16, idx % 16, 0, ws),
             lambda m=layers[2], ws=None: m(x, 14, ws)]
    workspace: dict = {}
    with torch.inference_mode():
        fresh = [f() for f in calls]
        for _ in range(2):  # the buffer grows once, then is reused in any order
            for f, ref in zip(calls[::-1], fresh[::-1]):
                assert torch.equal(f(ws=workspace), ref)
    assert len(workspace) == 1


def test_tokens_per_window_matches_paper_budget():
    assert tokens_per_window(0.25, (64, 64), 14) == 41  # not round(0.25 * 196) = 49
    assert tokens_per_window(1.0, (64, 64), 14) == 196
    # 82 would route 2032 < 2048 real tokens: the corner window has only 64
    assert tokens_per_window(0.5, (64, 64), 14) == 83


def _window_of(pos_h, pos_w, ws=14, n_cols=5):
    return (pos_h // ws) * n_cols + pos_w // ws


def test_routing_k_per_window_and_no_pads():
    torch.manual_seed(0)
    scores = torch.rand(2, 64, 64)
    r = route_tokens(scores, 0.25, 14)
    assert r.k == 41
    win = _window_of(r.pos_h, r.pos_w)
    for b in range(2):
        counts = torch.bincount(win[b], minlength=25)
        assert counts.tolist() == [41] * 25
        assert len(set(r.gather_idx[b].tolist())) == 25 * 41  # no token twice
    assert r.real.all() and r.all_real  # every window has >= 64 real tokens >= k
    assert r.mask.sum().item() == 2 * 25 * 41
    # the chosen tokens are the top-41 of their window
    s = scores[0].reshape(-1)
    w0 = (r.pos_h[0] < 14) & (r.pos_w[0] < 14)
    chosen = s[r.gather_idx[0][w0]]
    top = torch.topk(scores[0, :14, :14].reshape(-1), 41).values
    assert torch.allclose(chosen.sort().values, top.sort().values)


def test_routing_pads_only_when_window_is_short():
    scores = torch.rand(1, 64, 64)
    r = route_tokens(scores, 0.5, 14)  # k=83 > 64 real tokens of the corner window
    assert not r.all_real and not r.real.all()
    win = _window_of(r.pos_h, r.pos_w)[0]
    for w in range(25):
        in_w = win == w
        n_real = int(r.real[0][in_w].sum())
        full_rows = 14 if w // 5 < 4 else 8
        full_cols = 14 if w % 5 < 4 else 8
        assert n_real == min(83, full_rows * full_cols)


def test_routing_is_local_to_windows():
    torch.manual_seed(0)
    scores = torch.rand(1, 64, 64)
    before = route_tokens(scores, 0.25, 14).mask
    scores2 = scores.clone()
    scores2[0, 14:28, 28:42] = torch.rand(14, 14)  # window (1, 2) only
    after = route_tokens(scores2, 0.25, 14).mask
    changed = (before != after)[0]
    assert changed[14:28, 28:42].any()
    changed[14:28, 28:42] = False
    assert not changed.any()


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan"), True, "0.5"])
def test_keep_ratio_validation(bad, monkeypatch):
    sam = blsam_model_registry["tiny_bl"](img_size=64)
    with pytest.raises(ValueError, match="keep_ratio"):
        sam.image_encoder.keep_ratio = bad
    # refused before any block is built, for the full-width models too
    bb = sys.modules["blsam.build_blsam"]  # the package exports a function of that name
    monkeypatch.setattr(bb, "BLViTImageEncoder", lambda *a, **k: pytest.fail("built"))
    for name in ("tiny_bl", "b_t", "h_b"):
        with pytest.raises(ValueError, match="keep_ratio"):
            blsam_model_registry[name](img_size=64, keep_ratio=bad)
    with pytest.raises(ValueError, match="img_size"):
        blsam_model_registry["h_b"](img_size=100)
    sam.image_encoder.keep_ratio = 0.5
    assert sam.image_encoder.keep_ratio == 0.5


@pytest.mark.parametrize("variant", ["tiny_bl", "b_t", "h_b"])
def test_structure_on_meta_device(variant):
    """Full-width structure without compute: blocks, E-blocks, predictors, layer kinds."""
    n_p, n_e, n_pred, teacher, after = SPECS[variant]
    with torch.device("meta"):
        enc = blsam_model_registry[variant]().image_encoder
    spec = get_spec(variant)
    assert spec.teacher == teacher
    assert len(enc.blocks) == n_p
    assert sum(hasattr(b, "e_block") for b in enc.blocks) == n_e
    assert len(enc.predictors) == n_pred
    assert [j + 1 for j in spec.encoder.predictor_after] == after
    for i, (blk, mode) in enumerate(zip(enc.blocks, spec.encoder.layer_modes)):
        assert blk.mode == mode and hasattr(blk, "e_block") == (mode == "big_little"), i


@pytest.mark.parametrize("variant", ["b_t", "h_b", "vit_b", "vit_h"])
def test_state_dict_keys_on_meta_device(variant):
    """SAM's names: every key of the official encoder is a key of ours (P-blocks initialise
    from it), the rest are E-blocks, predictors and fusion scales; no compute, no memory."""
    teacher = get_spec(variant).teacher or variant
    with torch.device("meta"):
        ours = blsam_model_registry[variant]().state_dict()
        official = build_vanilla_sam(teacher).state_dict()
    extra = set(ours) - set(official)
    assert set(official) <= set(ours)
    assert all(any(t in k for t in ("e_block.", "predictors.", "alpha_", "gamma_")) for k in extra)
    assert all(ours[k].shape == official[k].shape for k in official)
    assert bool(extra) == get_spec(variant).is_blvit


def test_init_values():
    enc = blsam_model_registry["tiny_bl"](img_size=64).image_encoder
    for n, p in enc.named_parameters():
        if "gamma" in n:
            assert torch.all(p == 1e-5), n
        if "alpha" in n:
            assert torch.all(p == 0), n


def test_batched_matches_single_images():
    torch.manual_seed(0)
    enc = blsam_model_registry["tiny_bl"](img_size=256).image_encoder
    randomize_(enc, fusion=True)
    x = torch.randn(3, 3, 256, 256)
    with torch.no_grad():
        batched = enc(x)
        masks = [m["mask"] for m in enc.last_routing]
        for i in range(3):
            single = enc(x[i : i + 1])
            assert (single - batched[i : i + 1]).abs().max().item() < 1e-4
            for m_b, m_s in zip(masks, enc.last_routing):
                assert torch.equal(m_b[i], m_s["mask"][0])


def test_routing_exposed():
    enc = blsam_model_registry["tiny_bl"](img_size=256).image_encoder
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        feats, stages = enc(x, return_routing=True)
    assert feats.shape == (1, 256, 16, 16)
    assert [s["after_layer"] for s in enc.last_routing] == [2, 4]
    k = tokens_per_window(0.25, (16, 16), 14)
    assert all(s.k == k for s in stages)
    assert enc.last_routing[0]["mask"].shape == (1, 16, 16)


@pytest.mark.parametrize("variant", ["tiny_bl", *FULL_WIDTH])
def test_gradient_reaches_every_parameter(variant):
    torch.manual_seed(0)
    enc = blsam_model_registry[variant](img_size=64, keep_ratio=0.25).image_encoder
    randomize_(enc, fusion=True)  # nonzero alpha/gamma/E outputs: every path carries gradient
    enc.train()
    assert_gradient_reaches_every_parameter(enc, torch.randn(2, 3, 64, 64))


def test_bf16_autocast_cpu():
    enc = blsam_model_registry["tiny_bl"](img_size=128).image_encoder
    randomize_(enc, fusion=True)
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        ref = enc(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = enc(x)
    assert torch.isfinite(out).all()
    cos = torch.nn.functional.cosine_similarity(out.float().flatten(), ref.flatten(), dim=0)
    assert cos > 0.98


def test_bad_input_is_a_clear_error():
    enc = blsam_model_registry["tiny_bl"](img_size=64).image_encoder
    with pytest.raises(ValueError, match=r"\(B, 3, 64, 64\)"):
        enc(torch.randn(1, 3, 32, 32))
    with pytest.raises(TypeError, match="floating"):
        enc(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="multiple of 16"):
        blsam_model_registry["tiny_bl"](img_size=100)


def test_flops_budget_is_below_vit_b():
    """Cheap structural check of the cost model: k*windows / real tokens ~ keep ratio."""
    k = tokens_per_window(0.25, (64, 64), 14)
    assert math.isclose(k * 25 / 4096, 0.25, abs_tol=0.01)


@pytest.mark.parametrize("variant, rel_pos_share", [
    ("tiny_bl", 0.1), pytest.param("b_t", 0.02, marks=pytest.mark.slow)])
def test_every_projection_is_an_nn_linear_call(variant, rel_pos_share):
    """Module-hook FLOP counters must see every projection (Q-only and K/V-only included, and
    the patch embedding, a conv computed as a GEMM): hook MACs equal the aten-level count."""
    from torch.utils.flop_counter import FlopCounterMode

    from blsam.modeling.image_encoder import PatchProj

    enc = blsam_model_registry[variant](img_size=128).image_encoder
    macs = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: macs.append(o.numel() * m.in_features))
        for m in enc.modules()
        if isinstance(m, torch.nn.Linear)
    ]
    patch = enc.patch_embed.proj
    assert isinstance(patch, PatchProj)
    hooks.append(patch.register_forward_hook(
        lambda m, i, o: macs.append(o.numel() * m.weight[0].numel())))
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        enc(torch.randn(1, 3, 128, 128))
    for h in hooks:
        h.remove()
    counts = fc.get_flop_counts()["Global"]
    linear_macs = sum(v for k, v in counts.items() if str(k) in ("aten.addmm", "aten.mm")) // 2
    rel_pos_macs = linear_macs - sum(macs)  # the remaining mm are the rel-pos table products
    assert sum(macs) > 0 and 0 <= rel_pos_macs < rel_pos_share * linear_macs
