"""A slow, obvious float64 reference of EViT and Evo-ViT on SAM that the encoders must match.

The oracle loops over tokens: every active query forms its keys from the active tokens of its
14x14 window (kept pad slots as zero tokens) or of the image, adds SAM's decomposed
relative-position bias term by term, and takes a plain softmax; the received-attention score
of a key is the mean of its softmax weight over heads and real queries, times the number of
keys. Selection ranks each window's real tokens by score and fills short windows with their
first pad slots. It shares no code with ``blsam.modeling``, only the parameter tensors.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from blsam.build_blsam import PRUNING_ENCODERS
from blsam.modeling.image_encoder import EncoderSpec
from blsam.modeling.pruning import PruningSpec
from blsam.testing import randomize_

D = torch.float64
Pos = tuple[int, int]


def _ln(x: torch.Tensor, norm) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + norm.eps) * norm.weight.to(D) + norm.bias.to(D)


def _lin(x: torch.Tensor, lin) -> torch.Tensor:
    return x @ lin.weight.to(D).t() + lin.bias.to(D)


def _mlp(blk, x: torch.Tensor) -> torch.Tensor:
    h = _lin(_ln(x, blk.norm2), blk.mlp.lin1)
    return x + _lin(0.5 * h * (1 + torch.erf(h / math.sqrt(2))), blk.mlp.lin2)


def _windows(h: int, w: int, ws: int) -> list[list[Pos | None]]:
    """Every window's slots in row-major order: a real position, or None for a pad slot."""
    out = []
    for r0 in range(0, h, ws):
        for c0 in range(0, w, ws):
            out.append([(r0 + i, c0 + j) if r0 + i < h and c0 + j < w else None
                        for i in range(ws) for j in range(ws)])
    return out


def _attention(blk, x: torch.Tensor, active: dict[int, list[tuple[int, Pos | None]]],
               global_: bool, grid: Pos) -> tuple[dict[Pos, torch.Tensor], dict[Pos, float]]:
    """active: per window (or one group if global) its (slot, position-or-None) members.
    Returns every real member's attention output (before residual) and received score."""
    attn = blk.attn
    dim = attn.qkv.weight.shape[1]
    heads = attn.num_heads
    hd = dim // heads
    ws = blk.window_size
    outs, scores = {}, {}
    for members in active.values():
        feats = [_ln(x[p], blk.norm1) if p is not None else torch.zeros(dim, dtype=D)
                 for _, p in members]
        qkv = _lin(torch.stack(feats), attn.qkv)  # (n, 3*dim): a pad slot projects to the bias
        coords = torch.tensor([(p if global_ else divmod(s, ws)) for s, p in members])
        kh, kw = grid if global_ else (ws, ws)
        recv = torch.zeros(len(members), dtype=D)
        n_real = sum(p is not None for _, p in members)
        for qi, (_, p) in enumerate(members):  # one query at a time
            if p is None:
                continue
            dh = coords[qi, 0] - coords[:, 0] + kh - 1  # key offsets into the tables
            dw = coords[qi, 1] - coords[:, 1] + kw - 1
            out = []
            for hh in range(heads):
                q = qkv[qi, hh * hd:(hh + 1) * hd]
                keys = qkv[:, dim + hh * hd:dim + (hh + 1) * hd]
                vals = qkv[:, 2 * dim + hh * hd:2 * dim + (hh + 1) * hd]
                logits = (keys @ q * attn.scale + attn.rel_pos_h.to(D)[dh] @ q
                          + attn.rel_pos_w.to(D)[dw] @ q)
                pr = torch.softmax(logits, 0)
                recv += pr / (heads * n_real)
                out.append(pr @ vals)
            outs[p] = _lin(torch.cat(out), attn.proj)
        for ki, (_, p) in enumerate(members):
            if p is not None:
                scores[p] = float(recv[ki]) * len(members)
    return outs, scores


def _groups(kept: dict[int, list[int]] | None, h: int, w: int, ws: int, global_: bool):
    """Active members per attention group. kept: per window its kept slots (None: all)."""
    wins = _windows(h, w, ws)
    members = {i: [(s, win[s]) for s in (range(len(win)) if kept is None else kept[i])]
               for i, win in enumerate(wins)}
    if global_:
        return {0: [(s, p) for m in members.values() for s, p in m if p is not None]}
    return members


def _select(scores: dict[Pos, float], h: int, w: int, ws: int, k: int) -> dict[int, list[int]]:
    out = {}
    for i, win in enumerate(_windows(h, w, ws)):
        real = sorted((s for s, p in enumerate(win) if p is not None),
                      key=lambda s: -scores[win[s]])
        pads = [s for s, p in enumerate(win) if p is None]
        out[i] = real[:k] + pads[:max(0, k - len(real))]
    return out


def oracle(enc, img: torch.Tensor) -> torch.Tensor:
    pr = enc.pruning
    ws = enc.window_size
    pe = enc.patch_embed.proj
    x = F.conv2d(img.to(D), pe.weight.to(D), pe.bias.to(D), stride=pe.stride)[0].permute(1, 2, 0)
    x = x + enc.pos_embed.to(D)[0]
    h, w = x.shape[:2]
    k = enc.tokens_per_window
    kept: dict[int, list[int]] | None = None
    scores: dict[Pos, float] = {}
    for i, blk in enumerate(enc.blocks):
        glob = blk.window_size == 0
        members = _groups(kept, h, w, ws, glob)
        outs, s = _attention(blk, x, members, glob, (h, w))
        active: set[Pos] = set(outs)
        for p, o in outs.items():
            x[p] = x[p] + o
        if pr.method == "evit" and i == pr.layers[0]:
            kept = _select(s, h, w, ws, k)
            active = {p for j, win in enumerate(_windows(h, w, ws)) for sl in kept[j]
                      if (p := win[sl]) is not None}
        if pr.method == "evovit" and i < pr.layers[-1] and i >= pr.layers[0] - 1:
            t = 1.0 if i == pr.layers[0] - 1 else pr.tradeoff
            for p, v in s.items():
                scores[p] = (1 - t) * scores.get(p, 0.0) + t * v
        for p in active:
            x[p] = _mlp(blk, x[p])
        if pr.method == "evovit" and i + 1 in pr.layers:
            kept = _select(scores, h, w, ws, k)
    return enc.neck.to(D)(x.permute(2, 0, 1)[None]).float()


@pytest.mark.parametrize("method, layers", [("evit", (1,)), ("evovit", (2, 4))])
def test_encoder_matches_per_token_oracle(method, layers):
    """4x4 windows on 10x10 tokens (windows of 16, 8 and 4 real tokens; globals at 2, 4, 6):
    every window prunes, short windows keep pad slots (EViT k=5, Evo-ViT k=8)."""
    spec = EncoderSpec(embed_dim=32, depth=6, num_heads=2, global_attn_indexes=(1, 3, 5),
                       layer_modes=("full",) * 6, window_size=4, out_chans=16)
    torch.manual_seed(0)
    enc = PRUNING_ENCODERS[method](spec, PruningSpec(method, layers), img_size=160)
    enc = randomize_(enc.double(), seed=1)
    img = torch.randn(2, 3, 160, 160, dtype=D)
    with torch.no_grad():
        y = enc(img)
        ref = torch.cat([oracle(enc, img[i:i + 1]) for i in range(2)])
    assert len(enc.last_routing) == len(layers)
    assert 0 < enc.last_routing[0].mask.float().mean() < 1
    assert (y.float() - ref).abs().max().item() < 1e-6
