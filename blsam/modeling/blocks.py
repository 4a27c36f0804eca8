"""Transformer blocks of the big.LITTLE encoder.

One ``BigLittleBlock`` class covers the three layer kinds of paper §4.1, so the P-block keeps
SAM's parameter names (``norm1``, ``attn``, ``norm2``, ``mlp``) at every depth:

* ``full``: a plain SAM ViT block over all tokens (the first layers);
* ``big_little``: P-block on the routed tokens + E-block on all tokens, fused with gamma;
* ``p_only``: P-block on the routed tokens, the other tokens pass unchanged (H+B odd layers).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from segment_anything.modeling.common import MLPBlock

from .attention import Attention, Workspace, exporting
from .routing import Routing, select_rows

LAYER_MODES = ("full", "big_little", "p_only")


class DimMatchMLP(nn.Module):
    """E-block FFN: Linear in -> small ViT MLP -> Linear out (paper: "dimension matching")."""

    def __init__(self, dim: int, inner_dim: int, mlp_dim: int) -> None:
        super().__init__()
        self.lin_in = nn.Linear(dim, inner_dim)
        self.lin1 = nn.Linear(inner_dim, mlp_dim)
        self.act = nn.GELU()
        self.lin2 = nn.Linear(mlp_dim, inner_dim)
        self.lin_out = nn.Linear(inner_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin_out(self.lin2(self.act(self.lin1(self.lin_in(x)))))


class EBlock(nn.Module):
    """LITTLE efficiency block: a small ViT block whose in/out width matches the main stream.

    Its output projections start at zero, so an untrained E-block leaves unrouted tokens
    unchanged instead of adding noise to SAM's features; training moves them off zero.
    """

    def __init__(
        self,
        dim: int,
        inner_dim: int,
        num_heads: int,
        mlp_ratio: float,
        window_size: int,
        input_size: tuple[int, int],
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        attn_size = (window_size, window_size) if window_size > 0 else input_size
        self.attn = Attention(inner_dim, num_heads, attn_size, in_dim=dim, out_dim=dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = DimMatchMLP(dim, inner_dim, int(inner_dim * mlp_ratio))
        for lin in (self.attn.proj, self.mlp.lin_out):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def attention(self, x: torch.Tensor, workspace: Workspace = None) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C) E-attention output (before the residual)."""
        return self.attn(self.norm1(x), self.window_size, workspace)

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm2(x))


class BigLittleBlock(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        window_size: int = 0,
        input_size: tuple[int, int] = (64, 64),
        mode: str = "full",
        e_dim: int | None = None,
        e_heads: int | None = None,
        e_mlp_ratio: float = 4.0,
        gamma_init: float = 1e-5,
        p_attention: str = "semi",
        modulate: bool = True,
    ) -> None:
        super().__init__()
        if mode not in LAYER_MODES:
            raise ValueError(f"unknown layer mode {mode!r}, expected one of {LAYER_MODES}")
        self.mode = mode
        self.window_size = window_size
        self.p_attention = p_attention  # "semi": routed queries, all keys; "self": routed only
        self.modulate = modulate and mode != "full"
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        attn_size = (window_size, window_size) if window_size > 0 else input_size
        self.attn = Attention(dim, num_heads, attn_size)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio))
        if self.modulate:
            # alpha scales P outputs by (alpha * s + 1): the predictor's only gradient path
            self.alpha_attn = nn.Parameter(torch.zeros(1))
            self.alpha_mlp = nn.Parameter(torch.zeros(1))
        if mode == "big_little":
            if e_dim is None or e_heads is None:
                raise ValueError("a big_little block needs e_dim and e_heads")
            self.e_block = EBlock(dim, e_dim, e_heads, e_mlp_ratio, window_size, input_size)
            self.gamma_attn = nn.Parameter(torch.full((dim,), gamma_init))
            self.gamma_mlp = nn.Parameter(torch.full((dim,), gamma_init))

    def forward(
        self, x: torch.Tensor, routing: Routing | None = None, workspace: Workspace = None,
        score: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``score`` (full blocks): also return the (B, H, W) attention each token received,
        the routing score of ``EncoderSpec.scorer == "attention"``."""
        if self.mode == "full":
            a = self.attn(self.norm1(x), self.window_size, workspace, scores=score)
            a, received = a if score else (a, None)
            x = x + a
            x = x + self.mlp(self.norm2(x))
            return (x, received) if score else x
        if score:
            raise ValueError("only a full block scores tokens by attention")
        if routing is None:
            raise RuntimeError("a routed block needs the routing of a preceding predictor")
        b, h, w, c = x.shape
        r = routing
        s = r.scores.unsqueeze(-1)

        p = self._p_attention(x, r, workspace)
        if self.modulate:
            p = p * (self.alpha_attn * s + 1)
        e = self.e_block.attention(x, workspace) if self.mode == "big_little" else None
        xf = self._fuse(x.reshape(b, h * w, c), p, e, r, getattr(self, "gamma_attn", None))

        p = self.mlp(self.norm2(select_rows(xf, r.gather_idx)))
        if self.modulate:
            p = p * (self.alpha_mlp * s + 1)
        e = self.e_block.ffn(xf) if self.mode == "big_little" else None
        xf = self._fuse(xf, p, e, r, getattr(self, "gamma_mlp", None))
        return xf.view(b, h, w, c)

    def _p_attention(self, x: torch.Tensor, r: Routing, workspace: Workspace) -> torch.Tensor:
        """Semi-cross (or, ``p_attention="self"``, self-) attention of the routed tokens ->
        (B, n_routed, C)."""
        xn = self.norm1(x)
        ws = self.window_size
        if self.p_attention == "self":
            return self.attn.forward_routed(xn, r, ws)
        if ws > 0:
            q_h, q_w = r.slot // ws, r.slot % ws
        else:  # pad slots (routed only when a window has < k real tokens) are computed, dropped
            q_h, q_w = r.pos_h.clamp(max=x.shape[1] - 1), r.pos_w.clamp(max=x.shape[2] - 1)
        return self.attn.forward_semi(xn, r.gather_idx, q_h, q_w, ws, workspace, r.windows)

    @staticmethod
    def _fuse(
        xf: torch.Tensor,
        p: torch.Tensor,
        e: torch.Tensor | None,
        r: Routing,
        gamma: torch.Tensor | None,
    ) -> torch.Tensor:
        """Residual + fusion (Algorithm 1): routed x_p + gamma*x_e, others x_e (or unchanged)."""
        b, n, c = xf.shape
        export = exporting()  # index_copy/index_add export as ScatterElements with an index
        # expanded over channels; index_put with one row index is a ScatterND of whole rows
        if e is None:
            upd = (p * r.real.unsqueeze(-1)).to(xf.dtype).reshape(-1, c)
            if export:
                return xf.reshape(-1, c).index_put((r.take_rows,), upd, accumulate=True).view(
                    b, n, c)
            return xf.reshape(-1, c).index_add(0, r.take_rows, upd).view(b, n, c)
        e = e.reshape(b, n, c)
        upd = p + gamma * select_rows(e, r.gather_idx)
        if r.all_real:  # common case: write the routed rows over x + x_e in place
            out = (xf + e).view(-1, c)
            new = (select_rows(xf, r.gather_idx) + upd).to(out.dtype).reshape(-1, c)
            if export:  # (and the ONNX tracer mis-exports in-place writes to views)
                return out.index_put((r.take_rows,), new).view(b, n, c)
            return out.index_copy_(0, r.take_rows, new).view(b, n, c)
        # one trash row per image takes the pad slots, so no real token is written twice
        delta = F.pad(e, (0, 0, 0, 1)).reshape(-1, c)
        upd = upd.to(e.dtype).reshape(-1, c)
        if export:
            delta = delta.index_put((r.put_rows,), upd)
        else:
            delta = delta.index_copy(0, r.put_rows, upd)
        return xf + delta.view(b, n + 1, c)[:, :n]
