"""Multi-head attention with SAM's decomposed relative positions, through fused SDPA.

The module keeps SAM's parameter names (``qkv``, ``proj``, ``rel_pos_h``, ``rel_pos_w``) so an
official checkpoint loads unchanged. Two entry points share one kernel path:

* ``forward``: self-attention over all tokens of a (B, H, W, C) map, in 14x14 windows (with
  SAM's zero padding) or globally;
* ``forward_semi``: semi-cross attention (paper §3.2), where only the routed tokens are queries
  and all tokens are keys/values. Q is projected for the routed tokens only.

Projections run on the real tokens only: a zero pad token projects to the bias alone, so the
padded K/V (and Q) are the bias, one extra row that the window layout gathers for every pad
slot. This is exactly SAM's arithmetic without spending matmuls on the 16% pad tokens of a
1024-px image. Window partition and un-partition are single row gathers (``index_select``)
rather than SAM's pad + permute copies.

The relative-position bias is built per *query position* and passed to
``F.scaled_dot_product_attention`` (or, where ``attention_path`` picks it, batched ``bmm``) as an
additive mask; that equals SAM's
``add_decomposed_rel_pos`` on the full attention matrix, restricted to those queries.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from contextvars import ContextVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from .routing import Routing, select_rows

Workspace = dict[tuple, torch.Tensor] | None


def rel_terms(
    q: torch.Tensor,
    q_h: torch.Tensor,
    q_w: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    k_size: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, heads, Nq, kh) and (B, heads, Nq, kw): each query's row and column bias terms for
    every key row / column of the grid."""
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
    return th.gather(-1, idx_h), tw.gather(-1, idx_w)


def rel_pos_bias_at(
    q: torch.Tensor,
    q_h: torch.Tensor,
    q_w: torch.Tensor,
    k_h: torch.Tensor,
    k_w: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    k_size: tuple[int, int],
) -> torch.Tensor:
    """``rel_pos_bias`` for an arbitrary key subset of the grid (token pruning: kept tokens
    attend to kept tokens only). k_h, k_w: (B, Nk) grid row/column of every key.
    Returns (B, heads, Nq, Nk)."""
    rel_h, rel_w = rel_terms(q, q_h, q_w, rel_pos_h, rel_pos_w, k_size)
    b, nh, nq, _ = rel_h.shape
    nk = k_h.shape[-1]
    ih = k_h.view(b, 1, 1, nk).expand(b, nh, nq, nk)
    iw = k_w.view(b, 1, 1, nk).expand(b, nh, nq, nk)
    return rel_h.gather(-1, ih).add_(rel_w.gather(-1, iw))  # one (Nq, Nk) buffer fewer


def rel_pos_bias(
    q: torch.Tensor,
    q_h: torch.Tensor,
    q_w: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    k_size: tuple[int, int],
    workspace: Workspace = None,
) -> torch.Tensor:
    """Additive attention bias of SAM's decomposed relative positions for arbitrary queries.

    Args:
        q: (B, heads, Nq, hd) unscaled queries.
        q_h, q_w: (B or 1, Nq) integer row/column of every query in the key grid.
        rel_pos_h, rel_pos_w: (2*kh-1, hd) and (2*kw-1, hd) tables.
        k_size: (kh, kw) key grid.
        workspace: inference only; a dict holding one bias buffer that every layer reuses
            (P and E, window and global: each bias is dead once its attention has run), instead
            of a fresh 200 MB allocation (page-faulted on CPU) per global-layer kind.
    Returns:
        (B, heads, Nq, kh*kw) bias, bias[q, (i, j)] = <q, Rh[qh-i+kh-1]> + <q, Rw[qw-j+kw-1]>.
    """
    kh, kw = k_size
    b, nh, nq, _ = q.shape
    rel_h, rel_w = rel_terms(q, q_h, q_w, rel_pos_h, rel_pos_w, k_size)
    rel_h, rel_w = rel_h.unsqueeze(-1), rel_w.unsqueeze(-2)
    if workspace is None or torch.is_grad_enabled():
        return (rel_h + rel_w).reshape(b, nh, nq, kh * kw)
    key = ("rel_pos_bias", q.dtype, q.device)
    numel = b * nh * nq * kh * kw
    buf = workspace.get(key)
    if buf is None or buf.numel() < numel:
        buf = workspace[key] = torch.empty(numel, dtype=q.dtype, device=q.device)
    out = buf[:numel].view(b, nh, nq, kh, kw)
    return torch.add(rel_h, rel_w, out=out).view(b, nh, nq, kh * kw)


class RowSliceLinear(nn.Linear):
    """``nn.Linear`` that can apply one row block of its weight (Q only, or K/V only), skip its
    bias, or write into ``out`` (a 2-D slice of a larger buffer; inference only). It is still
    called as a module, so forward hooks and module-based FLOP counters see every projection,
    and its parameters keep SAM's names (``qkv.weight``, ``qkv.bias``)."""

    def forward(
        self,
        x: torch.Tensor,
        rows: slice = slice(None),
        add_bias: bool = True,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        bias = self.bias[rows] if add_bias and self.bias is not None else None
        if out is None:
            return F.linear(x, self.weight[rows], bias)
        if bias is None:
            return torch.mm(x, self.weight[rows].t(), out=out)
        return torch.addmm(bias, x, self.weight[rows].t(), out=out)


def _padded(n: int, ws: int) -> int:
    # (not -(-n // ws)): exporters lower integer division as truncation, not floor
    return (n + ws - 1) // ws * ws


def window_rows(b: int, h: int, w: int, ws: int, device: torch.device) -> torch.Tensor:
    """(B*nW*ws*ws,) for every slot of SAM's padded window partition, its row in the flattened
    (B*H*W + 1, C) tokens; pad slots read the extra last row (B*H*W)."""
    hp, wp = _padded(h, ws), _padded(w, ws)
    n = b * h * w
    idx = torch.arange(n, device=device).view(b, h, w)
    # pad with -1, then point pad slots at row n: ``F.pad(value=n)`` would bake the batch size
    # into a compiled graph (torch.compile recompiled the teacher for every batch size)
    idx = F.pad(idx, (0, wp - w, 0, hp - h), value=-1)
    idx = torch.where(idx < 0, n, idx)
    return idx.view(b, hp // ws, ws, wp // ws, ws).permute(0, 1, 3, 2, 4).reshape(-1)


def unwindow_rows(b: int, h: int, w: int, ws: int, device: torch.device) -> torch.Tensor:
    """(B*H*W,) the window-partition slot of every real token (the inverse of window_rows)."""
    hp, wp = _padded(h, ws), _padded(w, ws)
    slot = torch.arange(b * hp * wp, device=device)
    slot = slot.view(b, hp // ws, wp // ws, ws, ws).permute(0, 1, 3, 2, 4).reshape(b, hp, wp)
    return slot[:, :h, :w].reshape(-1)


def exporting() -> bool:
    """Being traced or exported (ONNX): no ``out=`` kernels, no in-place writes to views, no
    data-dependent shapes."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


# The export kernel (``blsam.utils.onnx.export_attention``); None: the fused ONNX Runtime node,
# the exporter's default
EXPORT_KERNEL: ContextVar[Callable | None] = ContextVar("blsam_export_attention", default=None)


def export_kernel() -> Callable:
    kernel = EXPORT_KERNEL.get()
    if kernel is None:
        from blsam.utils.onnx import attend_fused  # ONNX code lives beside the exporter

        kernel = attend_fused
    return kernel


ATTENTION_PATHS = ("sdpa", "bmm")
# ``BLSAM_ATTENTION=sdpa|bmm`` (or ``use_attention_path``) forces a path: benchmarks and tests
_FORCED: ContextVar[str | None] = ContextVar("blsam_attention_path", default=None)


def _amx() -> bool:
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def attention_path(device_type: str, dtype: torch.dtype) -> str:
    """The attention kernel for ``device_type`` and ``dtype``, chosen by measurement (the one
    place the rule lives; the benchmark records it per row).

    Fused SDPA everywhere except bf16/fp16 on a CPU without AMX: there (2-core AMD EPYC with
    AVX512-BF16, 1024 px) SDPA's CPU flash kernel with an additive bias does not speed up
    from fp32 (1.16 -> 1.10 s per b_t forward) while batched ``bmm`` does (SAM's explicit
    attention 2.08 -> 0.76 s). With AMX (Intel Xeon) SDPA wins in bf16 as well: a global
    4096-token layer 576 ms SDPA vs 1515 ms ``bmm``, a 14x14 window layer 60 vs 80 ms
    (docs/benchmarks/notes.md). Meta and other devices: SDPA (FLOP counting decomposes it).
    """
    forced = _FORCED.get() or os.environ.get("BLSAM_ATTENTION", "").strip().lower() or None
    if forced is not None:
        if forced not in ATTENTION_PATHS:
            raise ValueError(f"BLSAM_ATTENTION must be one of {ATTENTION_PATHS}, got {forced!r}")
        return forced
    if device_type == "cpu" and dtype in (torch.bfloat16, torch.float16) and not _amx():
        return "bmm"
    return "sdpa"


@contextlib.contextmanager
def use_attention_path(path: str | None) -> Iterator[None]:
    """Force ``path`` ("sdpa", "bmm"; None: the rule) inside this block."""
    if path is not None and path not in ATTENTION_PATHS:
        raise ValueError(f"attention path must be one of {ATTENTION_PATHS}, got {path!r}")
    token = _FORCED.set(path)
    try:
        yield
    finally:
        _FORCED.reset(token)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float,
           bias_is_scratch: bool = False) -> torch.Tensor:
    """softmax(q.k^T * scale + bias) v on (B, heads, N, hd) tensors through the path
    ``attention_path`` picks. ``bias_is_scratch``: the bias is dead after this call, so the
    ``bmm`` path may write the logits into it (inference only)."""
    if attention_path(q.device.type, q.dtype) == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    b, h, nq, d = q.shape
    nk = k.shape[2]
    qf, kf = q.reshape(b * h, nq, d), k.reshape(b * h, nk, d).transpose(1, 2)
    logits = bias.expand(b, h, nq, nk).reshape(b * h, nq, nk)
    if bias_is_scratch and not torch.is_grad_enabled() and logits.data_ptr() == bias.data_ptr():
        logits = logits.baddbmm_(qf, kf, alpha=scale)  # the bias buffer becomes the logits
    else:
        logits = torch.baddbmm(logits, qf, kf, alpha=scale)
    out = torch.bmm(logits.softmax(-1), v.reshape(b * h, nk, v.shape[-1]))
    return out.view(b, h, nq, v.shape[-1])


def _plain_inference(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Eager, no autograd, no autocast, one dtype: ``out=`` kernels are allowed."""
    if torch.is_grad_enabled() or exporting() or x.dtype != weight.dtype:
        return False
    return x.device.type in ("cpu", "cuda") and not torch.is_autocast_enabled(x.device.type)


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
        input_size: tuple[int, int],
        in_dim: int | None = None,
        out_dim: int | None = None,
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
        self.qkv = RowSliceLinear(in_dim or dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, out_dim or dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, self.head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, self.head_dim))

    def _heads(self, t: torch.Tensor, n_parts: int) -> torch.Tensor:
        """(B, N, n_parts*dim) -> (n_parts, B, heads, N, hd)."""
        b, n, _ = t.shape
        return t.view(b, n, n_parts, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)

    def _project_windows(
        self,
        xn: torch.Tensor,
        rows: slice,
        window_size: int,
        windows: torch.Tensor | None = None,
        add_bias: bool = True,
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """Project tokens with qkv rows ``rows`` into SAM's padded window partition.

        ``windows`` (B, M): only these windows (padding-aware routing skips the others); their
        slots are gathered first (pad slots as zero tokens), then projected.
        ``add_bias=False``: no bias anywhere (pad slots are then zero rows).
        Returns (B*nW or B*M or B, N, width) tokens and the key grid.
        """
        b, h, wd, c = xn.shape
        if window_size <= 0:
            return self.qkv(xn, rows, add_bias).flatten(1, 2), (h, wd)
        n = b * h * wd
        area = window_size * window_size
        idx = window_rows(b, h, wd, window_size, xn.device)
        if windows is not None:
            idx = idx.view(b, -1, area).gather(1, windows.unsqueeze(-1).expand(-1, -1, area))
            xz = torch.cat([xn.reshape(n, c), xn.new_zeros(1, c)])
            parts = xz.index_select(0, idx.reshape(-1)).view(-1, area, c)
            return self.qkv(parts, rows, add_bias), (window_size, window_size)
        # SAM pads *after* norm1, so a pad token projects to the bias alone: project the real
        # tokens, append one bias row, and lay every window slot out with one row gather
        # (instead of pad + partition copies and a bias add over all slots)
        width = self.qkv.weight[rows].shape[0]
        bias = self.qkv.bias[rows] if add_bias and self.qkv.bias is not None else None
        x2 = xn.reshape(n, c)
        if exporting() and c < width:
            # the pad row as a zero token *before* the projection (it projects to the bias):
            # the graph's Concat copies the c-wide input, not the 2-3x wider projection
            t = self.qkv(torch.cat([x2, x2.new_zeros(1, c)]), rows, add_bias)
        elif not _plain_inference(xn, self.qkv.weight):
            t = self.qkv(x2, rows, add_bias)
            pad = bias.to(t.dtype).unsqueeze(0) if bias is not None else t.new_zeros(1, width)
            t = torch.cat([t, pad])
        else:  # inference: project straight into the buffer that holds the bias row
            t = torch.empty(n + 1, width, dtype=xn.dtype, device=xn.device)
            self.qkv(x2, rows, add_bias, out=t[:n])
            t[n] = 0 if bias is None else bias
        return t.index_select(0, idx).view(-1, area, width), (window_size, window_size)

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        q_h: torch.Tensor,
        q_w: torch.Tensor,
        k_size: tuple[int, int],
        workspace: Workspace = None,
    ) -> torch.Tensor:
        """(B, heads, Nq, hd) queries -> (B, Nq, dim) attention output before ``proj``."""
        if exporting():
            return export_kernel()(self, q, k, v, q_h, q_w, k_size)
        bias = rel_pos_bias(q, q_h, q_w, self.rel_pos_h, self.rel_pos_w, k_size, workspace)
        out = attend(q, k, v, bias.to(q.dtype), self.scale, bias_is_scratch=True)
        b, _, n, _ = out.shape
        return out.transpose(1, 2).reshape(b, n, self.dim)

    def forward(
        self, xn: torch.Tensor, window_size: int = 0, workspace: Workspace = None,
        scores: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Self-attention of a normalised (B, H, W, in_dim) map -> (B, H, W, out_dim).

        ``scores``: also return (B, H, W) fp32 the attention each token receives (mean over
        heads and real queries, x keys: 1 = uniform), detached (attention-scored routing)."""
        b, h, w, _ = xn.shape
        qkv, grid = self._project_windows(xn, slice(None), window_size)
        q, k, v = self._heads(qkv, 3).unbind(0)
        pos = torch.arange(grid[0] * grid[1], device=xn.device).unsqueeze(0)
        q_h, q_w = pos // grid[1], pos % grid[1]
        out = self._attend(q, k, v, q_h, q_w, grid, workspace)
        back = unwindow_rows(b, h, w, window_size, xn.device) if window_size > 0 else None
        if back is not None:  # back to the image layout, pad slots dropped, before ``proj``
            out = out.reshape(-1, self.dim).index_select(0, back)
        out = self.proj(out.reshape(b, h, w, self.dim))
        if not scores:
            return out
        from .pruning import _received  # (pruning builds on this module)

        with torch.no_grad():
            weight = None  # window layers: SAM's pad slots are queries, but not counted
            if back is not None:
                area = window_size * window_size
                weight = (window_rows(b, h, w, window_size, xn.device) < b * h * w).view(
                    -1, area).float()

            def bias_fn(lo: int, hi: int) -> torch.Tensor:
                return rel_pos_bias(q[:, :, lo:hi], q_h[:, lo:hi], q_w[:, lo:hi],
                                    self.rel_pos_h, self.rel_pos_w, grid).to(q.dtype)

            s = _received(q.detach(), k.detach(), bias_fn, self.scale, weight).reshape(-1)
            s = s.index_select(0, back) if back is not None else s
        return out, s.view(b, h, w)

    def forward_routed(self, xn: torch.Tensor, r: Routing, window_size: int = 0
                       ) -> torch.Tensor:
        """Self-attention among the routed tokens only (no semi-cross attention: the Table-3
        ablation step before it) -> (B, n, out_dim) outputs of the routed slots.

        Window layers: the routed tokens of each window attend to each other; a routed pad
        slot outside the image is a zero token after norm1, exactly SAM's window padding.
        Global layers: the routed tokens of the image; pad slots are no keys. A slot that is
        not routed (padding-aware routing) is no key. So keep ratio 1 is SAM's attention."""
        b, h, w, c = xn.shape
        d = self.dim
        xr = select_rows(xn.reshape(b, h * w, c), r.gather_idx)
        xr = xr * r.real.unsqueeze(-1).to(xr.dtype)
        t = self.qkv(xr)  # (B, n, 3*dim): routed slots only
        if window_size > 0:
            t = t.reshape(-1, r.k, 3 * d)
            q_h, q_w, k_size = r.slot // window_size, r.slot % window_size, (window_size,) * 2
            outside = (r.pos_h >= h) | (r.pos_w >= w)  # SAM's zero pad tokens: keys
            key_ok = (r.real | outside).reshape(-1, r.k)
        else:
            q_h, q_w, k_size = r.pos_h.clamp(max=h - 1), r.pos_w.clamp(max=w - 1), (h, w)
            key_ok = r.real
        q, k, v = self._heads(t, 3).unbind(0)
        bias = rel_pos_bias_at(q, q_h, q_w, q_h, q_w, self.rel_pos_h, self.rel_pos_w, k_size)
        if not r.all_real:
            n = key_ok.shape[-1]  # every slot sees itself: no query without a key
            ok = key_ok[:, None, None, :] | torch.eye(n, dtype=torch.bool, device=xn.device)
            bias = bias.masked_fill(~ok, float("-inf"))
        out = attend(q, k, v, bias.to(q.dtype), self.scale, bias_is_scratch=True)
        return self.proj(out.transpose(1, 2).reshape(b, -1, d))

    def forward_semi(
        self,
        xn: torch.Tensor,
        gather_idx: torch.Tensor,
        q_h: torch.Tensor,
        q_w: torch.Tensor,
        window_size: int = 0,
        workspace: Workspace = None,
        windows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Semi-cross attention of routed tokens over all tokens of their window (or image).

        Args:
            xn: (B, H, W, C) normalised tokens (keys/values for all, queries for the routed).
            gather_idx: (B, n) flat H*W index of every routed token (window-major order).
            q_h, q_w: (B*nW, k) positions inside the window, or (B, n) in the image if global.
            windows: (B, M) the windows the queries come from, if not all of them (window
                layers with padding-aware routing): only their K/V are projected.
        Returns:
            (B, n, out_dim) outputs of the routed tokens.
        """
        b, h, w, c = xn.shape
        d = self.dim
        # K/V without bias: K's bias adds q.b_k to every logit of a query (softmax ignores a
        # constant) and V's adds b_v to every output (the weights sum to 1), so b_v goes onto
        # the n routed outputs instead of every key slot (pad slots, all bias, become zeros)
        kv, grid = self._project_windows(
            xn, slice(d, None), window_size, windows if window_size > 0 else None, False)
        k, v = self._heads(kv, 2).unbind(0)
        q = self.qkv(select_rows(xn.reshape(b, h * w, c), gather_idx), slice(None, d))
        q = q.reshape(k.shape[0], -1, d)  # (B*nW, k, C) for windows, (B, n, C) if global
        q = self._heads(q, 1)[0]
        out = self._attend(q, k, v, q_h, q_w, grid, workspace)
        if self.qkv.bias is not None:
            out = out + self.qkv.bias[2 * d:].to(out.dtype)
        return self.proj(out.reshape(b, -1, d))
