"""Multi-head attention with SAM's decomposed relative positions, through fused SDPA.

The module keeps SAM's parameter names (``qkv``, ``proj``, ``rel_pos_h``, ``rel_pos_w``) so an
official checkpoint loads unchanged. Two entry points share one kernel path:

* ``forward``: self-attention over every token of a window (or of the image);
* ``forward_semi``: semi-cross attention (paper §3.2), where only the routed tokens are queries
  and all tokens are keys/values. Q is projected for the routed tokens only.

The relative-position bias is built per *query position* and passed to
``F.scaled_dot_product_attention`` as an additive mask, which equals SAM's
``add_decomposed_rel_pos`` applied to the full attention matrix, restricted to those queries.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


def rel_pos_bias(
    q: torch.Tensor,
    q_h: torch.Tensor,
    q_w: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    k_size: Tuple[int, int],
) -> torch.Tensor:
    """Additive attention bias of SAM's decomposed relative positions for arbitrary queries.

    Args:
        q: (B, heads, Nq, hd) unscaled queries.
        q_h, q_w: (B or 1, Nq) integer row/column of every query in the key grid.
        rel_pos_h, rel_pos_w: (2*kh-1, hd) and (2*kw-1, hd) tables.
        k_size: (kh, kw) key grid.
    Returns:
        (B, heads, Nq, kh*kw) bias, bias[q, (i, j)] = <q, Rh[qh-i+kh-1]> + <q, Rw[qw-j+kw-1]>.
    """
    kh, kw = k_size
    b, nh, nq, _ = q.shape
    # Project every query on the whole table once ((2k-1) columns), then pick the k entries
    # each query needs: cheaper than materialising SAM's (Nq, k, hd) gathered tables.
    th = torch.matmul(q, rel_pos_h.to(q.dtype).t())  # (B, heads, Nq, 2kh-1)
    tw = torch.matmul(q, rel_pos_w.to(q.dtype).t())
    ar_h = torch.arange(kh, device=q.device)
    ar_w = torch.arange(kw, device=q.device)
    idx_h = (q_h.unsqueeze(-1) - ar_h + (kh - 1)).unsqueeze(1).expand(b, nh, nq, kh)
    idx_w = (q_w.unsqueeze(-1) - ar_w + (kw - 1)).unsqueeze(1).expand(b, nh, nq, kw)
    rel_h = th.gather(-1, idx_h)
    rel_w = tw.gather(-1, idx_w)
    return (rel_h.unsqueeze(-1) + rel_w.unsqueeze(-2)).reshape(b, nh, nq, kh * kw)


class Attention(nn.Module):
    """SAM attention block with optional dimension matching (E-blocks).

    ``in_dim``/``out_dim`` are the token-stream width; ``dim`` is the inner attention width.
    For P-blocks all three are equal; for an E-block (paper: "input and output dimensions are
    modified directly") ``qkv`` maps in_dim -> 3*dim and ``proj`` maps dim -> out_dim.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        input_size: Tuple[int, int],
        in_dim: Optional[int] = None,
        out_dim: Optional[int] = None,
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.input_size = tuple(input_size)
        self.qkv = nn.Linear(in_dim or dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, out_dim or dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, self.head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, self.head_dim))

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        q_h: torch.Tensor,
        q_w: torch.Tensor,
        k_size: Tuple[int, int],
    ) -> torch.Tensor:
        bias = rel_pos_bias(q, q_h, q_w, self.rel_pos_h, self.rel_pos_w, k_size)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=self.scale)
        b, _, n, _ = out.shape
        return self.proj(out.transpose(1, 2).reshape(b, n, self.dim))

    def forward(self, x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        """Self-attention. x: (B, gh*gw, in_dim) tokens of a (gh, gw) grid -> (B, N, out_dim)."""
        b, n, _ = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        pos = torch.arange(n, device=x.device).unsqueeze(0)
        return self._attend(q, k, v, pos // grid[1], pos % grid[1], grid)

    def forward_semi(
        self,
        x_q: torch.Tensor,
        q_h: torch.Tensor,
        q_w: torch.Tensor,
        x_kv: torch.Tensor,
        grid: Tuple[int, int],
    ) -> torch.Tensor:
        """Semi-cross attention: (B, Nq, in_dim) routed queries over (B, gh*gw, in_dim) keys."""
        d = self.dim
        w, bias = self.qkv.weight, self.qkv.bias
        q = F.linear(x_q, w[:d], None if bias is None else bias[:d])
        kv = F.linear(x_kv, w[d:], None if bias is None else bias[d:])
        b, n, _ = kv.shape
        k, v = kv.view(b, n, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return self._attend(self._heads(q), k, v, q_h, q_w, grid)
