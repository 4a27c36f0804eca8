"""What the token-pruning baselines (EViT, Evo-ViT) share on SAM's encoder.

SAM has no CLS token, attends in 14x14 windows with decomposed relative positions, and its
neck needs the whole 64x64 map. So, for both baselines:

* a token's importance is the attention it *receives*: the softmax weight averaged over heads
  and (real) queries, times the number of keys (1 = uniform), so window and global layers
  give scores on one scale (the stand-in for the attention a CLS token pays to each patch);
* the kept tokens are chosen per 14x14 window, the same number k in every window (pad slots
  rank last), so kept tokens stay rectangular (windows, k) batches;
* kept tokens attend to kept tokens only, as in the original methods: inside their window in
  window layers, over the whole image in global layers, with SAM's relative-position bias
  taken at their true coordinates (``rel_pos_bias_at``); a kept pad slot (a window with fewer
  than k real tokens) is a zero token after ``norm1``, exactly SAM's window padding;
* pruned tokens keep their features and are written back to their place before the neck.

Keep ratio 1 keeps every slot, which is SAM's forward exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
from segment_anything.modeling.image_encoder import Block, ImageEncoderViT

from .attention import attend, exporting, rel_pos_bias_at
from .image_encoder import BLViTImageEncoder, EncoderSpec, RoutingStage
from .routing import _windowed, window_counts

METHODS = ("evit", "evovit")
SCORE_CHUNK = 512  # queries per chunk when scoring a global layer (bounds the softmax memory)


@dataclass(frozen=True)
class PruningSpec:
    """Where a baseline prunes. ``layers`` (0-based): EViT, the one layer it cuts inside (after
    attention + residual, before the MLP); Evo-ViT, the layers that (re-)select the kept tokens,
    the first being its first pruned layer. ``tradeoff``: Evo-ViT's EMA weight of new scores."""

    method: str
    layers: tuple[int, ...]
    tradeoff: float = 0.5

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown pruning method {self.method!r}, expected one of {METHODS}")
        if not self.layers or list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"pruning layers must be increasing and non-empty: {self.layers}")


@dataclass
class KeptSet:
    """The kept tokens of every image: k slots per window, real ones first in each window.

    The kept features live as a compact (B, n_real, C) tensor in window-major order; ``slot_rows``
    lays them out as (B*nW, k) window batches (pad slots read one extra row), ``take_rows`` puts
    them back into the (B*H*W, C) map.
    """

    k: int
    n_windows: int
    flat: torch.Tensor  # (B, n_real) flat H*W index of every kept real token
    take_rows: torch.Tensor  # (B*n_real,) row in the flattened (B*H*W, C) map
    slot_rows: torch.Tensor  # (B*nW*k,) row in (B*n_real + 1): pad slots -> the last row
    real_slots: torch.Tensor  # (B*n_real,) position of every real token in the slot layout
    win_h: torch.Tensor  # (B*nW, k) row of every slot inside its window
    win_w: torch.Tensor  # (B*nW, k)
    pos_h: torch.Tensor  # (B, n_real) row of every kept real token in the image
    pos_w: torch.Tensor  # (B, n_real)
    real_query: torch.Tensor  # (nW, k) bool: the slot holds a real token


def tokens_kept(method: str, keep_ratio: float, grid: tuple[int, int], ws: int) -> int:
    """k kept slots per window. EViT: at most keep_ratio of the real tokens in kept slots,
    spread evenly (floor(r * N / nW)); Evo-ViT: keep_ratio of each window's slots (ceil(r * ws^2),
    "half of each window"). keep_ratio 1 keeps every slot (SAM exactly)."""
    area = ws * ws
    if keep_ratio >= 1.0:
        return area
    if method == "evit":
        n_win = len(window_counts(grid, ws))
        k = math.floor(round(keep_ratio * grid[0] * grid[1] / n_win, 6))
    else:
        k = math.ceil(round(keep_ratio * area, 6))
    return max(1, min(area, k))


def select_kept(score_map: torch.Tensor, k: int, ws: int) -> KeptSet:
    """Top-k scored tokens of every window of the padded grid. score_map: (B, H, W), >= 0.

    Pads score below -1, so each window's first min(k, real tokens) slots are its real tokens:
    which slots are real is known from the shapes alone (the meta-device FLOP count needs that).
    A window with fewer than k real tokens keeps its first pad slots (row-major)."""
    b, h, w = score_map.shape
    dev = score_map.device
    counts = window_counts((h, w), ws)
    nw, nww = len(counts), math.ceil(w / ws)
    s = _windowed(score_map.detach().float(), ws, -1.0)
    # pads: -1 - slot / area, so a window short of real tokens keeps its first pad slots
    pad_score = -1.0 - torch.arange(ws * ws, device=dev, dtype=s.dtype) / (ws * ws)
    s = torch.where(s < 0, pad_score, s)
    slot = s.topk(k, dim=-1).indices  # (B, nW, k)
    win = torch.arange(nw, device=dev).view(1, nw, 1)
    pos_h = ((win // nww) * ws + slot // ws).reshape(b, -1)
    pos_w = ((win % nww) * ws + slot % ws).reshape(b, -1)
    n_real_w = [min(k, c) for c in counts]
    real_idx = [i * k + j for i in range(nw) for j in range(n_real_w[i])]
    n_real = len(real_idx)
    rank = [-1] * (nw * k)
    for r, i in enumerate(real_idx):
        rank[i] = r
    real_idx_t = torch.tensor(real_idx, device=dev)
    rank_t = torch.tensor(rank, device=dev)
    base = torch.arange(b, device=dev).view(b, 1)
    slot_rows = torch.where(rank_t >= 0, rank_t + base * n_real, b * n_real)
    flat = (pos_h * w + pos_w)[:, real_idx_t]
    real_query = torch.tensor([[j < n_real_w[i] for j in range(k)] for i in range(nw)],
                              device=dev)
    return KeptSet(
        k=k, n_windows=nw, flat=flat, take_rows=(flat + base * (h * w)).reshape(-1),
        slot_rows=slot_rows.reshape(-1), real_slots=(real_idx_t + base * (nw * k)).reshape(-1),
        win_h=(slot // ws).reshape(-1, k), win_w=(slot % ws).reshape(-1, k),
        pos_h=pos_h[:, real_idx_t], pos_w=pos_w[:, real_idx_t], real_query=real_query)


def keep_all(x: torch.Tensor, ws: int) -> KeptSet:
    """Every slot kept (a dense layer run through the kept-token path, e.g. to score it)."""
    b, h, w, _ = x.shape
    grid = torch.arange(h * w, device=x.device, dtype=torch.float32).view(1, h, w)
    return select_kept(grid.expand(b, h, w), ws * ws, ws)


def gather_kept(x: torch.Tensor, kept: KeptSet) -> torch.Tensor:
    """(B, H, W, C) map -> (B, n_real, C) kept tokens."""
    b, _, _, c = x.shape
    return x.reshape(-1, c).index_select(0, kept.take_rows).view(b, -1, c)


def scatter_kept(x: torch.Tensor, xs: torch.Tensor, kept: KeptSet) -> torch.Tensor:
    """Write the kept tokens back into their place in the (B, H, W, C) map."""
    c = x.shape[-1]
    return x.reshape(-1, c).index_copy(0, kept.take_rows, xs.reshape(-1, c).to(x.dtype)).view(
        x.shape)


def _received(q: torch.Tensor, k: torch.Tensor, bias_fn, scale: float,
              query_weight: torch.Tensor | None) -> torch.Tensor:
    """Mean softmax weight each key receives (over heads and weighted queries) x n_keys.

    q, k: (Bw, heads, N, hd); bias_fn(lo, hi) -> the (Bw, heads, hi-lo, N) bias of those
    queries; query_weight: (Bw, N) 0/1 (pad queries excluded) or None. Returns (Bw, N) fp32."""
    bw, nh, n, _ = q.shape
    total = q.new_zeros(bw, n, dtype=torch.float32)
    for lo in range(0, n, SCORE_CHUNK):
        hi = min(n, lo + SCORE_CHUNK)
        logits = torch.matmul(q[:, :, lo:hi] * scale, k.transpose(-1, -2)) + bias_fn(lo, hi)
        p = logits.float().softmax(-1).sum(1)  # (Bw, chunk, N), summed over heads
        if query_weight is not None:
            p = p * query_weight[:, lo:hi, None]
        total = total + p.sum(1)
    n_q = query_weight.sum(1, keepdim=True) if query_weight is not None else n
    return total / (nh * n_q) * n


def kept_attention(blk: Block, xs: torch.Tensor, kept: KeptSet, grid: tuple[int, int],
                   score: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of the kept tokens among themselves (before the residual).

    Returns (B, n_real, C) outputs and, with ``score``, (B, n_real) received-attention scores."""
    attn, ws = blk.attn, blk.window_size
    b, n, c = xs.shape
    xn = blk.norm1(xs)
    t = attn.qkv(xn)  # (B, n_real, 3C): real tokens only
    if ws > 0:  # window batches; a kept pad slot is a zero token: its q/k/v are the bias
        pad = attn.qkv.bias.to(t.dtype).view(1, -1) if attn.qkv.bias is not None else \
            t.new_zeros(1, t.shape[-1])
        t = torch.cat([t.reshape(-1, t.shape[-1]), pad]).index_select(0, kept.slot_rows)
        t = t.view(b * kept.n_windows, kept.k, -1)
        q_h, q_w, k_size = kept.win_h, kept.win_w, (ws, ws)
    else:
        q_h, q_w, k_size = kept.pos_h, kept.pos_w, grid
    dim = attn.proj.in_features
    q, k, v = t.view(*t.shape[:2], 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)

    def bias_fn(lo: int = 0, hi: int | None = None) -> torch.Tensor:
        return rel_pos_bias_at(q[:, :, lo:hi], q_h[:, lo:hi], q_w[:, lo:hi], q_h, q_w,
                               attn.rel_pos_h, attn.rel_pos_w, k_size)

    out = attend(q, k, v, bias_fn().to(q.dtype), attn.scale, bias_is_scratch=True)
    out = out.transpose(1, 2).reshape(-1, dim)
    if ws > 0:  # back to the compact layout, pad slots dropped
        out = out.index_select(0, kept.real_slots)
    out = attn.proj(out.view(b, n, dim))
    scores = None
    if score:
        with torch.no_grad():
            weight = None
            if ws > 0:
                weight = kept.real_query.to(torch.float32).repeat(b, 1)
            s = _received(q.detach(), k.detach(), bias_fn, attn.scale, weight)
            if ws > 0:
                s = s.reshape(-1).index_select(0, kept.real_slots)
            scores = s.view(b, n)
    return out, scores


def kept_mlp(blk: Block, xs: torch.Tensor) -> torch.Tensor:
    return xs + blk.mlp(blk.norm2(xs))


def score_map_of(scores: torch.Tensor, kept: KeptSet, grid: tuple[int, int],
                 old: torch.Tensor | None = None, tradeoff: float = 1.0) -> torch.Tensor:
    """(B, H*W) score map: the kept tokens' scores (EMA with ``old`` at weight ``tradeoff``),
    the others keep ``old`` (zeros if none)."""
    b = scores.shape[0]
    if old is None:
        old = scores.new_zeros(b, grid[0] * grid[1])
    new = scores if tradeoff >= 1.0 else (
        (1 - tradeoff) * old.gather(1, kept.flat) + tradeoff * scores)
    return old.scatter(1, kept.flat, new)


class PrunedImageEncoder(ImageEncoderViT):
    """segment_anything's ``ImageEncoderViT`` itself (SAM's modules and parameter names, no
    extra parameters: official checkpoints load strictly), whose subclasses prune tokens.

    Layers before the first cut run SAM's own blocks unchanged (pad slots and all, as the
    official encoder the paper counted); ``keep_ratio`` (default 0.5) is the knob.
    ``last_routing`` holds one ``RoutingStage`` per (re-)selection: the kept-token mask."""

    method = ""

    def __init__(self, spec: EncoderSpec, pruning: PruningSpec, img_size: int = 1024,
                 keep_ratio: float = 0.5) -> None:
        if any(m != "full" for m in spec.layer_modes) or spec.predictor_after:
            raise ValueError("a pruning baseline is built on a vanilla SAM ViT spec")
        if pruning.method != self.method:
            raise ValueError(f"{type(self).__name__} needs a {self.method!r} pruning spec")
        if pruning.layers[-1] >= spec.depth or pruning.layers[0] < (self.method == "evovit"):
            raise ValueError(f"pruning layers {pruning.layers} outside 0..{spec.depth - 1} "
                             f"(Evo-ViT needs a dense layer first)")
        if img_size % spec.patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of {spec.patch_size}")
        super().__init__(
            depth=spec.depth, embed_dim=spec.embed_dim, img_size=img_size,
            mlp_ratio=spec.mlp_ratio, norm_layer=partial(nn.LayerNorm, eps=1e-6),
            num_heads=spec.num_heads, patch_size=spec.patch_size, qkv_bias=True,
            use_rel_pos=True, global_attn_indexes=spec.global_attn_indexes,
            window_size=spec.window_size, out_chans=spec.out_chans)
        self.spec, self.pruning = spec, pruning
        self.window_size = spec.window_size
        self.grid = (img_size // spec.patch_size,) * 2
        self.keep_ratio = keep_ratio
        self.last_routing: list[RoutingStage] = []
        self.grad_checkpointing = False  # set by blsam.train.distill.enable_grad_checkpointing

    keep_ratio = BLViTImageEncoder.keep_ratio  # the same validated knob, changeable at run time

    @property
    def skip_padding(self) -> bool:
        return False

    @skip_padding.setter
    def skip_padding(self, value: bool) -> None:
        if value:
            raise ValueError("the pruning baselines have no padding-aware routing")

    @property
    def tokens_per_window(self) -> int:
        return tokens_kept(self.method, self.keep_ratio, self.grid, self.window_size)

    def _start(self, x: torch.Tensor) -> torch.Tensor:
        BLViTImageEncoder._check_input(self, x)  # same input rule and messages
        if exporting():
            raise RuntimeError(f"{self.method}: data-dependent token pruning is not exported")
        return self.patch_embed(x) + self.pos_embed

    def _finish(self, x: torch.Tensor, stages: list[tuple[int, KeptSet]]) -> torch.Tensor:
        b, h, w, _ = x.shape
        self.last_routing = []
        for after, kept in stages:
            mask = torch.zeros(b, h * w, dtype=torch.bool, device=x.device)
            mask = mask.scatter(1, kept.flat, True).view(b, h, w)
            n = kept.flat.shape[1]
            self.last_routing.append(RoutingStage(
                after_layer=after, mask=mask, scores=mask.float(), k=kept.k,
                share=torch.full((b,), n / (h * w), device=x.device), skip_padding=False))
        return self.neck(x.permute(0, 3, 1, 2))


def _kept_layer(blk: nn.Module, xs: torch.Tensor, kept: KeptSet, grid: tuple[int, int],
                score: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    out, s = kept_attention(blk, xs, kept, grid, score)
    return kept_mlp(blk, xs + out), s


def run_kept_layer(blk: nn.Module, xs: torch.Tensor, kept: KeptSet, grid: tuple[int, int],
                   score: bool, checkpointed: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One whole block on the kept tokens; returns the tokens and (optionally) their scores.
    ``checkpointed`` (training with ``--grad-checkpoint``): recomputed in backward."""
    if checkpointed and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint

        return checkpoint(_kept_layer, blk, xs, kept, grid, score, use_reentrant=False)
    return _kept_layer(blk, xs, kept, grid, score)
