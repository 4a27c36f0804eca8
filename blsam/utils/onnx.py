"""Export-only attention kernels (ONNX), kept beside the exporter as SAM keeps its ONNX code.

``export_attention(fused)`` installs one of two kernels for the duration of an export; the model
itself only runs fused SDPA or the batched ``bmm`` path (``blsam.modeling.attention``):

* fused (default of ``blsam-export-onnx``): every bLViT attention is one com.microsoft
  ``MultiHeadAttention`` node (ONNX Runtime's fused CPU kernel) instead of MatMul, Softmax,
  MatMul over a materialised (heads, queries, keys) logits tensor (200 MB per global layer at
  1024 px);
* folded (``--no-fused-attention``): standard ONNX ops only, for runtimes without ONNX Runtime's
  contrib ops, with the relative-position bias folded into the Q.K product.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from blsam.modeling import attention as attn_mod

if TYPE_CHECKING:  # pragma: no cover
    from blsam.modeling.attention import Attention


def _mha_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int,
                   scale: float, bias: torch.Tensor | None) -> torch.Tensor:
    """What the node computes, on (B, S, heads*d) tensors (q/k and v head sizes may differ):
    per head ``softmax(q . k^T * scale + bias) v``, heads concatenated -> (B, Sq, heads*dv)."""
    b, n, _ = q.shape

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(b, t.shape[1], num_heads, -1).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=bias,
                                         scale=scale)
    return out.transpose(1, 2).reshape(b, n, -1)


def _mha_node(g, q, k, v, num_heads: int, scale: float, bias=None):  # noqa: ANN001 (graph values)
    if bias is None:
        out = g.op("com.microsoft::MultiHeadAttention", q, k, v, num_heads_i=num_heads,
                   scale_f=scale)
    else:  # inputs 3 and 4 (packed bias, key padding mask) absent, 5 the attention bias
        none = g.op("prim::Constant").setType(torch._C.OptionalType.ofTensor())
        out = g.op("com.microsoft::MultiHeadAttention", q, k, v, none, none, bias,
                   num_heads_i=num_heads, scale_f=scale)
    q_sizes, v_sizes = q.type().varyingSizes(), v.type().varyingSizes()
    if q_sizes and v_sizes and len(q_sizes) == 3:
        out.setType(v.type().with_sizes([q_sizes[0], q_sizes[1], v_sizes[2]]))
    return out


class _OrtMultiHeadAttention(torch.autograd.Function):
    """``_mha_reference`` without a bias; exported as one ``MultiHeadAttention`` node, which
    ONNX Runtime runs on its tiled flash kernel (no bias input is what allows that path)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,  # type: ignore[override]
                num_heads: int, scale: float) -> torch.Tensor:
        return _mha_reference(q, k, v, num_heads, scale, None)

    @staticmethod
    def symbolic(g, q, k, v, num_heads: int, scale: float):  # noqa: ANN001
        return _mha_node(g, q, k, v, num_heads, scale)


class _OrtBiasedMultiHeadAttention(torch.autograd.Function):
    """``_mha_reference`` with an additive (B, heads, Sq, Sk) bias (the node's
    ``attention_bias`` input): ONNX Runtime's unfused kernel, head by head."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,  # type: ignore[override]
                bias: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
        return _mha_reference(q, k, v, num_heads, scale, bias)

    @staticmethod
    def symbolic(g, q, k, v, bias, num_heads: int, scale: float):  # noqa: ANN001
        return _mha_node(g, q, k, v, num_heads, scale, bias)


def fold_rel_pos(
    attn: Attention, q: torch.Tensor, k: torch.Tensor, q_h: torch.Tensor, q_w: torch.Tensor,
    k_size: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and keys whose product is the scaled, relative-position-biased logits.

    bias[q, (i, j)] = A[q, i] + B[q, j] is a product of [A, B] with the one-hot code of
    each key's row and column, so ``[q * scale, A, B] . [k, onehot(i), onehot(j)]`` gives
    the biased logits in one MatMul: no (heads, Nq, Nk) bias tensor is built and added
    (two memory-bound broadcast Adds over 200 MB per global layer in ONNX Runtime, more
    than the kh + kw extra columns cost the MatMul), and a fused attention kernel without
    a bias input can run it. Returns (B, heads, Nq, hd+kh+kw) and (B, heads, Nk, hd+kh+kw).
    """
    kh, kw = k_size
    nh = q.shape[1]
    rel_h, rel_w = attn_mod.rel_terms(q, q_h, q_w, attn.rel_pos_h, attn.rel_pos_w, k_size)
    q_aug = torch.cat([q * attn.scale, rel_h, rel_w], -1)
    key = torch.arange(kh * kw, device=q.device)
    code = torch.cat([F.one_hot(key // kw, kh), F.one_hot(key % kw, kw)], -1).to(q.dtype)
    k_aug = torch.cat([k, code.expand(k.shape[0], nh, kh * kw, kh + kw)], -1)
    return q_aug, k_aug


def _tokens_major(t: torch.Tensor) -> torch.Tensor:  # (B, heads, N, d) -> (B, N, heads*d)
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1)


def attend_folded(attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  q_h: torch.Tensor, q_w: torch.Tensor, k_size: tuple[int, int]) -> torch.Tensor:
    """Standard ONNX ops, the bias folded into Q.K. Returns (B, Nq, dim)."""
    q_aug, k_aug = fold_rel_pos(attn, q, k, q_h, q_w, k_size)
    out = torch.matmul(torch.matmul(q_aug, k_aug.transpose(-1, -2)).softmax(-1), v)
    return _tokens_major(out)


def attend_fused(attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 q_h: torch.Tensor, q_w: torch.Tensor, k_size: tuple[int, int]) -> torch.Tensor:
    """One ONNX Runtime ``MultiHeadAttention`` node. Returns (B, Nq, dim).

    Self-attention (as many queries as keys) folds the relative-position bias into Q.K,
    which needs no bias input, so the node runs ONNX Runtime's flash kernel: at 1024 px
    a global E-layer takes ~255 ms, against ~290 ms for the (heads, Nq, Nk) bias path.
    Semi-attention (routed queries, fewer than the keys) passes the bias instead: flash
    tiles are poorly filled by 41 queries per window, and a 1025 x 4096 head fits in L3,
    so its plain 64-wide Q.K plus bias beats the 3x wider folded product (~210 vs ~320 ms
    per global P-layer, ~44 vs ~57 ms per window P-layer; 2-core AVX2 VM).
    """
    if q.shape[2] == k.shape[2]:
        q_aug, k_aug = fold_rel_pos(attn, q, k, q_h, q_w, k_size)
        return _OrtMultiHeadAttention.apply(
            _tokens_major(q_aug), _tokens_major(k_aug), _tokens_major(v), attn.num_heads, 1.0)
    bias = attn_mod.rel_pos_bias(q, q_h, q_w, attn.rel_pos_h, attn.rel_pos_w, k_size)
    return _OrtBiasedMultiHeadAttention.apply(
        _tokens_major(q), _tokens_major(k), _tokens_major(v), bias.to(q.dtype), attn.num_heads,
        attn.scale)


@contextlib.contextmanager
def export_attention(fused: bool = True) -> Iterator[None]:
    """Within this block, traced/exported bLViT attention uses the fused ONNX Runtime node
    (``fused``) or the folded standard-ops graph; eager calls are unaffected."""
    token = attn_mod.EXPORT_KERNEL.set(attend_fused if fused else attend_folded)
    try:
        yield
    finally:
        attn_mod.EXPORT_KERNEL.reset(token)
