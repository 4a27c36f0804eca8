"""A slow, obvious reference for Algorithm 1 that the fast encoder must match.

The oracle loops over tokens: for every routed token it projects its query, forms the keys and
values of every token of its 14x14 window (SAM's zero padding included) or of the whole image,
adds SAM's decomposed relative-position bias term by term, and takes a plain softmax. The
E-block runs the same loop over all tokens; fusion follows the paper's equations. It shares no
code with ``blsam.modeling`` except the parameter tensors it reads, and runs in float64.
"""
from __future__ import annotations

import math

import pytest
import torch

from blsam.modeling import BigLittleBlock, BLViTImageEncoder, EncoderSpec, route_tokens
from blsam.testing import randomize_

D = torch.float64


def _ln(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + norm.eps) * norm.weight.to(D) + norm.bias.to(D)


def _lin(x: torch.Tensor, lin: torch.nn.Linear, rows: slice | None = None) -> torch.Tensor:
    w, b = lin.weight.to(D), lin.bias.to(D)
    if rows is not None:
        w, b = w[rows], b[rows]
    return w @ x + b


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def _kv(attn, xn: torch.Tensor):
    """Keys and values of every token, and of a zero (pad) token: (H, W, dim) x 2, (dim,) x 2."""
    dim = attn.dim
    k = torch.einsum("hwc,oc->hwo", xn, attn.qkv.weight.to(D)[dim:2 * dim])
    v = torch.einsum("hwc,oc->hwo", xn, attn.qkv.weight.to(D)[2 * dim:])
    kb, vb = attn.qkv.bias.to(D)[dim:2 * dim], attn.qkv.bias.to(D)[2 * dim:]
    return k + kb, v + vb, kb, vb


def _attend_one(attn, xn: torch.Tensor, kv, i: int, j: int, ws: int) -> torch.Tensor:
    """Output of token (i, j) attending to every token of its window or of the image.

    xn: (H, W, in_dim) normalised tokens. Keys outside the image (window padding) are zero
    tokens, as SAM pads after the LayerNorm: their key and value are the projection bias."""
    h, w, _ = xn.shape
    dim, heads = attn.dim, attn.num_heads
    hd = dim // heads
    k_all, v_all, k_pad, v_pad = kv
    if ws > 0:
        r0, c0, kh, kw = (i // ws) * ws, (j // ws) * ws, ws, ws
    else:
        r0, c0, kh, kw = 0, 0, h, w
    qi, qj = i - r0, j - c0
    q = _lin(xn[i, j], attn.qkv, slice(0, dim))
    keys, values, pos = [], [], []
    for a in range(kh):
        for c in range(kw):
            y, x = r0 + a, c0 + c
            inside = y < h and x < w
            keys.append(k_all[y, x] if inside else k_pad)
            values.append(v_all[y, x] if inside else v_pad)
            pos.append((a, c))
    keys, values = torch.stack(keys), torch.stack(values)
    ka = torch.tensor([a for a, _ in pos])  # key row / column inside the window or image
    kc = torch.tensor([c for _, c in pos])
    rh, rw = attn.rel_pos_h.to(D), attn.rel_pos_w.to(D)
    out = torch.zeros(dim, dtype=D)
    for head in range(heads):
        sl = slice(head * hd, (head + 1) * hd)
        qh = q[sl]
        # SAM's decomposed rel-pos: <q, Rh[qi - ki + kh - 1]> + <q, Rw[qj - kj + kw - 1]>
        bias = rh[qi - ka + kh - 1] @ qh + rw[qj - kc + kw - 1] @ qh
        p = torch.softmax(keys[:, sl] @ qh * hd**-0.5 + bias, 0)
        out[sl] = p @ values[:, sl]
    return _lin(out, attn.proj)


@torch.no_grad()
def oracle_block(blk: BigLittleBlock, x: torch.Tensor, routed: torch.Tensor, s: torch.Tensor):
    """Algorithm 1 for one block. x: (B, H, W, C); routed: (B, H, W) bool; s: (B, H, W)."""
    x = x.to(D)
    out = x.clone()
    b_, h, w, _ = x.shape
    ws = blk.window_size
    for b in range(b_):
        # attention: P for routed tokens (semi-cross: keys are all tokens), E for all tokens
        xn = _ln(x[b], blk.norm1)
        kv = _kv(blk.attn, xn)
        if blk.mode == "big_little":
            e = blk.e_block
            xe = _ln(x[b], e.norm1)
            kv_e = _kv(e.attn, xe)
        x1 = x[b].clone()
        for i in range(h):
            for j in range(w):
                upd = torch.zeros_like(x1[i, j])
                if blk.mode == "full" or routed[b, i, j]:
                    upd = _attend_one(blk.attn, xn, kv, i, j, ws)
                    if blk.mode != "full":
                        upd = upd * (blk.alpha_attn.to(D) * s[b, i, j] + 1)
                if blk.mode == "big_little":
                    xe_out = _attend_one(e.attn, xe, kv_e, i, j, ws)
                    upd = upd + blk.gamma_attn.to(D) * xe_out if routed[b, i, j] else xe_out
                x1[i, j] = x[b, i, j] + upd
        # FFN
        for i in range(h):
            for j in range(w):
                t = x1[i, j]
                upd = torch.zeros_like(t)
                if blk.mode == "full" or routed[b, i, j]:
                    m = blk.mlp
                    upd = _lin(_gelu(_lin(_ln(t, blk.norm2), m.lin1)), m.lin2)
                    if blk.mode != "full":
                        upd = upd * (blk.alpha_mlp.to(D) * s[b, i, j] + 1)
                if blk.mode == "big_little":
                    m = blk.e_block.mlp
                    z = _lin(_ln(t, blk.e_block.norm2), m.lin_in)
                    xe_out = _lin(_lin(_gelu(_lin(z, m.lin1)), m.lin2), m.lin_out)
                    upd = upd + blk.gamma_mlp.to(D) * xe_out if routed[b, i, j] else xe_out
                out[b, i, j] = t + upd
    return out


def _block(mode: str, window: bool, grid: int, seed: int) -> BigLittleBlock:
    torch.manual_seed(seed)
    blk = BigLittleBlock(32, 2, 4.0, window_size=14 if window else 0, input_size=(grid, grid),
                         mode=mode, e_dim=16, e_heads=1)
    return randomize_(blk, seed=seed, fusion=True).eval()


_SLOW = pytest.mark.slow


@pytest.mark.parametrize("keep", [0.05, 0.25, 0.6])
@pytest.mark.parametrize("mode", ["big_little", "p_only"])
@pytest.mark.parametrize("window", [True, False], ids=["window", "global"])
@pytest.mark.parametrize("grid", [16, pytest.param(28, marks=_SLOW)],
                         ids=["grid16", "no_pad_slots"])
def test_block_matches_per_token_oracle(grid, window, mode, keep):
    """16x16 grid: windows with 196/28/28/4 real tokens, so k (20 or 94) routes pad slots,
    while keep 0.05 (k = 4) routes none; 28x28: four full windows, no pad slot."""
    blk = _block(mode, window, grid, seed=grid + int(keep * 10))
    x = torch.randn(1, grid, grid, 32)
    scores = torch.rand(1, grid, grid)
    r = route_tokens(scores, keep, 14)
    no_pad = grid == 28 or keep == 0.05
    assert r.all_real == no_pad and (r.real.all().item() == no_pad)
    with torch.no_grad():
        fast = blk(x, r)
    ref = oracle_block(blk, x, r.mask, scores.to(D))
    assert (fast.to(D) - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("grid", [16, pytest.param(28, marks=_SLOW)])
@pytest.mark.parametrize("window", [True, False], ids=["window", "global"])
def test_padding_aware_block_matches_oracle(window, grid):
    """Padding-aware routing (only windows with content; a batch of two aspect ratios)."""
    blk = _block("big_little", window, grid, seed=5)
    x = torch.randn(2, grid, grid, 32)
    scores = torch.rand(2, grid, grid)
    content = torch.zeros(2, grid, grid, dtype=torch.bool)
    cut = 20 if grid == 28 else 12  # content reaches into the second column / row of windows
    content[0, :, :cut] = True  # portrait-ish: the right column of windows has content
    content[1, :10] = True  # landscape: the bottom row of windows is all padding
    r = route_tokens(scores, 0.25, 14, content)
    assert r.windows is not None and not (r.mask & ~content).any()
    with torch.no_grad():
        fast = blk(x, r)
    ref = oracle_block(blk, x, r.mask, scores.to(D))
    assert (fast.to(D) - ref).abs().max().item() <= 1e-5


def _oracle_k(counts, keep, area):
    """Smallest k whose per-window routing reaches keep of the real tokens (or all of them)."""
    if keep >= 1:
        return area
    need = keep * sum(counts)
    return next(k for k in range(1, area + 1) if sum(min(k, c) for c in counts) >= need - 1e-9)


@torch.no_grad()
def oracle_encoder(enc: BLViTImageEncoder, img: torch.Tensor) -> torch.Tensor:
    """The whole encoder: patch embedding as per-patch products, pos_embed, blocks through
    ``oracle_block``, predictors and per-window top-k written out; SAM's neck as is."""
    ps = enc.spec.patch_size
    b, _, s, _ = img.shape
    g = s // ps
    wconv = enc.patch_embed.proj.weight.to(D).reshape(enc.spec.embed_dim, -1)
    x = torch.zeros(b, g, g, enc.spec.embed_dim, dtype=D)
    for n in range(b):
        for i in range(g):
            for j in range(g):
                patch = img[n, :, i * ps:(i + 1) * ps, j * ps:(j + 1) * ps].to(D).reshape(-1)
                x[n, i, j] = wconv @ patch + enc.patch_embed.proj.bias.to(D)
    x = x + enc.pos_embed.to(D)
    ws = enc.window_size
    routed = scores = None
    for idx, blk in enumerate(enc.blocks):
        x = oracle_block(blk, x, routed, scores).to(D)
        if idx in enc.spec.predictor_after:
            pred = enc.predictors[enc.spec.predictor_after.index(idx)]
            logits = torch.einsum("bhwc,oc->bhwo", _ln(x, pred.norm), pred.fc.weight.to(D))
            scores = torch.softmax(logits + pred.fc.bias.to(D), -1)[..., 0]
            # the predictor is checked here; top-k then ranks the encoder's own fp32 scores,
            # so a float64 near-tie cannot pick a different (equally right) token
            fast_scores = enc.last_routing[enc.spec.predictor_after.index(idx)]["scores"]
            assert (scores - fast_scores.to(D)).abs().max().item() < 1e-6
            routed = torch.zeros(b, g, g, dtype=torch.bool)
            wins = [(r0, c0) for r0 in range(0, g, ws) for c0 in range(0, g, ws)]
            counts = [min(ws, g - r0) * min(ws, g - c0) for r0, c0 in wins]
            k = _oracle_k(counts, enc.keep_ratio, ws * ws)
            for n in range(b):
                for r0, c0 in wins:
                    toks = [(fast_scores[n, i, j].item(), i, j) for i in range(r0, min(r0 + ws, g))
                            for j in range(c0, min(c0 + ws, g))]
                    for _, i, j in sorted(toks, reverse=True)[:k]:
                        routed[n, i, j] = True
    return enc.neck(x.float().permute(0, 3, 1, 2))


@pytest.mark.parametrize("keep", [0.25, pytest.param(0.6, marks=_SLOW)])
def test_encoder_matches_oracle_with_random_positions(keep):
    """full, big_little (global) and p_only (window) layers behind one predictor, random
    pos_embed and rel-pos tables, on a 16x16 grid with pad slots."""
    spec = EncoderSpec(32, 3, 2, global_attn_indexes=(1,),
                       layer_modes=("full", "big_little", "p_only"), predictor_after=(0,),
                       e_dim=16, e_heads=1, out_chans=16, name="tiny")
    torch.manual_seed(7)
    enc = randomize_(BLViTImageEncoder(spec, img_size=256, keep_ratio=keep), seed=7,
                     fusion=True).eval()
    img = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        fast = enc(img)
        ref = oracle_encoder(enc, img)  # reads the scores of this forward from last_routing
    assert enc.last_routing[0]["share"].item() >= keep
    assert (fast - ref).abs().max().item() <= 1e-4
