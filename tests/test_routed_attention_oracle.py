"""Float64 token-by-token oracle of ``Attention.forward_routed`` (the Table-3 steps before
semi-cross attention): routed tokens attend only to the routed tokens of their window (SAM's
zero pad tokens included) or, in global layers, of the image, with SAM's relative positions."""
from __future__ import annotations

import pytest
import torch

from blsam.modeling.attention import Attention, use_attention_path
from blsam.modeling.routing import route_tokens


def _oracle(attn: Attention, xn: torch.Tensor, r, ws: int) -> torch.Tensor:
    b, h, w, c = xn.shape
    d, nh = attn.dim, attn.num_heads
    hd = d // nh
    wq, bq = attn.qkv.weight, attn.qkv.bias
    n = r.gather_idx.shape[1]
    out = torch.zeros(b, n, attn.proj.out_features, dtype=xn.dtype)
    for bi in range(b):
        flat = xn[bi].reshape(-1, c)
        toks = [flat[r.gather_idx[bi, j]] if r.real[bi, j] else torch.zeros(c, dtype=xn.dtype)
                for j in range(n)]
        proj = [wq @ t + bq for t in toks]  # (3d,) per slot
        for i in range(n):
            if ws > 0:
                m = i // r.k
                keys = [j for j in range(n) if j // r.k == m]
                pos = {j: divmod(int(r.slot[bi * (n // r.k) + m, j % r.k]), ws) for j in keys}
                size = (ws, ws)
            else:
                keys = [j for j in range(n) if bool(r.real[bi, j]) or j == i]
                pos = {j: (min(int(r.pos_h[bi, j]), h - 1), min(int(r.pos_w[bi, j]), w - 1))
                       for j in range(n)}
                size = (h, w)
            heads = []
            for hh in range(nh):
                sl = slice(hh * hd, (hh + 1) * hd)
                q = proj[i][:d][sl]
                logits = []
                for j in keys:
                    k = proj[j][d:2 * d][sl]
                    (qr, qc), (kr, kc) = pos[i], pos[j]
                    rel = (q @ attn.rel_pos_h[qr - kr + size[0] - 1]
                           + q @ attn.rel_pos_w[qc - kc + size[1] - 1])
                    logits.append(q @ k * attn.scale + rel)
                p = torch.softmax(torch.stack(logits), 0)
                heads.append(sum(p[a] * proj[j][2 * d:][sl] for a, j in enumerate(keys)))
            out[bi, i] = attn.proj(torch.cat(heads))
    return out


@pytest.mark.parametrize("ws", [5, 0])
@pytest.mark.parametrize("path", ["sdpa", "bmm"])
def test_forward_routed_matches_the_token_oracle(ws, path):
    torch.manual_seed(0)
    h = w = 7  # windows of 5: padded to 10x10, the last windows partly outside the image
    attn = Attention(16, 2, (ws, ws) if ws else (h, w)).double()
    with torch.no_grad():
        attn.rel_pos_h.normal_()
        attn.rel_pos_w.normal_()
    xn = torch.randn(2, h, w, 16, dtype=torch.float64)
    r = route_tokens(torch.rand(2, h, w, dtype=torch.float64), 0.4, ws or 7)
    with torch.no_grad(), use_attention_path(path):
        got = attn.forward_routed(xn, r, ws)
        ref = _oracle(attn, xn, r, ws)
    real = r.real.unsqueeze(-1).expand_as(got)  # pad slots' outputs are discarded
    torch.testing.assert_close(got[real], ref[real], atol=1e-10, rtol=1e-10)
