"""Per-window top-k token routing (paper §4.1: "token selection occurs within each window").

Every routed 14x14 window routes the same number k of tokens, so the routed set is a dense
(B, windows, k) tensor that batches without Python loops.

``keep_ratio`` is the share of the image's *real* tokens that is routed. Windows at the bottom
and right edge of the padded grid hold fewer real tokens (at 1024 px: 112 or 64 of 196), so a
k that exceeds them would spend the budget on pad slots. k is therefore the smallest value with

    sum over windows of min(k, real tokens of the window) >= keep_ratio * N_real,

which routes keep_ratio of the real tokens up to less than one token per window (41 at 1024 px
and keep 0.25; 83 at keep 0.5, where the corner window routes its 64 real tokens).

Padding-aware routing (``content`` given; beyond the paper, opt-in): tokens whose 16x16 input
patch is exactly zero (SamPredictor's padding after normalisation) are never routed; windows
with no content route nothing, and keep_ratio of the *content* tokens is spread over the
windows with content by the same rule, per image. Images of one batch may differ in aspect
ratio: they share the routed-window count and k of the largest request, and the surplus slots
are pad slots (computed, discarded), so every image gets exactly its own budget.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def check_keep_ratio(value: float, what: str = "keep_ratio") -> float:
    """The one keep-ratio rule, used by the encoder, the builders and every CLI: a share of
    tokens in (0, 1]; NaN, bools and non-numbers are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number in (0, 1], got {value!r}")
    value = float(value)
    if not (0.0 < value <= 1.0):  # also rejects NaN
        raise ValueError(f"{what} must be in (0, 1], got {value}")
    return value


def _k_for_budget(counts: list[int], target: int, area: int) -> int:
    """Smallest k in [1, area] with sum(min(k, c)) >= target (or the largest useful k)."""
    k_max = max(counts) if counts else 1
    for k in range(1, min(area, max(k_max, 1)) + 1):
        if sum(min(k, c) for c in counts) >= target:
            return k
    return max(1, min(area, k_max))


def _target(keep_ratio: float, n: int) -> int:
    # round first: 0.7 * 1000 is 700.0000000000001 in floating point
    return math.ceil(round(keep_ratio * n, 6))


def window_counts(grid: tuple[int, int], window_size: int) -> list[int]:
    """Real tokens of every window of the padded grid, window-major (row of windows first)."""
    h, w = int(grid[0]), int(grid[1])  # int(): the ONNX exporter traces shapes as tensors
    ws = window_size
    rows = [min(ws, h - i) for i in range(0, h, ws)]
    cols = [min(ws, w - j) for j in range(0, w, ws)]
    return [r * c for r in rows for c in cols]


def tokens_per_window(keep_ratio: float, grid: tuple[int, int], window_size: int) -> int:
    """k routed tokens per window; keep_ratio >= 1 routes every slot (pad slots included)."""
    area = window_size * window_size
    if keep_ratio >= 1.0:
        return area
    counts = window_counts(grid, window_size)
    return _k_for_budget(counts, _target(keep_ratio, int(grid[0]) * int(grid[1])), area)


@dataclass
class Routing:
    """Which tokens a predictor stage routes to the P-blocks.

    All index tensors have shape (B, n_routed_windows * k) in window-major order, except
    ``slot`` and ``windows``.
    """

    slot: torch.Tensor  # (B*M, k) position inside the window (row-major), for window layers
    pos_h: torch.Tensor  # (B, n) row in the padded grid
    pos_w: torch.Tensor  # (B, n) column in the padded grid
    real: torch.Tensor  # (B, n) bool: a routed token (False: a pad slot, output discarded)
    gather_idx: torch.Tensor  # (B, n) flat H*W index; pad slots point at 0 (masked by `real`)
    scatter_idx: torch.Tensor  # (B, n) flat index into H*W+1 rows; pad slots hit the last row
    scores: torch.Tensor  # (B, n) fp32 scores of the routed tokens (carries gradient)
    score_map: torch.Tensor  # (B, H, W) all scores, detached
    k: int
    grid: tuple[int, int]  # (H, W) real token grid
    all_real: bool = False  # no pad slot routed: fusion can scatter in place, no trash row
    # (B, M) windows (index in the padded window grid) whose slots these are; None: all
    # windows in order (M = n_windows), the paper's routing
    windows: torch.Tensor | None = None
    # (B,) routed tokens / eligible tokens (real tokens, or content tokens if padding-aware)
    share: torch.Tensor | None = None
    # (B*n,) ``gather_idx`` / ``scatter_idx`` as rows of the flattened batch ((B*H*W, C) and
    # (B*(H*W+1), C)): whole-row index_copy/index_add instead of scatter with an index
    # expanded over channels, which reads one int64 per element (several times slower)
    take_rows: torch.Tensor | None = None
    put_rows: torch.Tensor | None = None

    @property
    def mask(self) -> torch.Tensor:
        """(B, H, W) bool map of routed real tokens (for visualisation and tests)."""
        b = self.real.shape[0]
        h, w = self.grid
        m = torch.zeros(b, h * w + 1, dtype=torch.bool, device=self.real.device)
        m.scatter_(1, self.scatter_idx, torch.ones_like(self.scatter_idx, dtype=torch.bool))
        return m[:, : h * w].view(b, h, w)


def select_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(B, N, C) tokens, (B, n) per-image token index -> (B, n, C), as whole-row copies."""
    b, n, c = x.shape
    if b > 1:
        idx = idx + torch.arange(b, device=idx.device).unsqueeze(1) * n
    return x.reshape(-1, c).index_select(0, idx.reshape(-1)).view(b, -1, c)


def _windowed(t: torch.Tensor, ws: int, value: float) -> torch.Tensor:
    """(B, H, W) -> (B, nW, ws*ws), padded with ``value``, window-major like SAM."""
    b, h, w = t.shape
    hp, wp = math.ceil(h / ws) * ws, math.ceil(w / ws) * ws
    t = F.pad(t, (0, wp - w, 0, hp - h), value=value)
    return t.view(b, hp // ws, ws, wp // ws, ws).permute(0, 1, 3, 2, 4).reshape(b, -1, ws * ws)


def route_tokens(
    scores: torch.Tensor,
    keep_ratio: float,
    window_size: int,
    content: torch.Tensor | None = None,
) -> Routing:
    """Select the top-k scored tokens in every window of the padded grid.

    Pad slots get score -1 (real scores are in (0, 1)), so they are only chosen when a window
    has fewer than k real tokens; they are then computed and discarded. ``content`` (B, H, W)
    bool switches on padding-aware routing (see the module docstring); it is ignored at
    keep_ratio >= 1, where every token is routed and the encoder equals SAM.
    """
    if content is not None and keep_ratio < 1.0:
        return _route_content(scores, keep_ratio, window_size, content)
    b, h, w = scores.shape
    ws = window_size
    nwh, nww = math.ceil(h / ws), math.ceil(w / ws)
    k = tokens_per_window(keep_ratio, (h, w), ws)
    dev = scores.device

    if k >= ws * ws:
        slot = torch.arange(ws * ws, device=dev).expand(b, nwh * nww, ws * ws)
    else:
        s = _windowed(scores.detach(), ws, -1.0)
        # sorted slots keep memory access monotone inside a window
        slot = s.topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values
    win = torch.arange(nwh * nww, device=dev).view(1, -1, 1)
    pos_h = (win // nww) * ws + slot // ws
    pos_w = (win % nww) * ws + slot % ws
    real = (pos_h < h) & (pos_w < w)
    routed = sum(min(k, c) for c in window_counts((h, w), ws))  # known from shapes: no sync
    return _finish(scores, slot, pos_h, pos_w, real, k, None,
                   torch.full((b,), routed / (h * w), device=dev),
                   # pads rank last, so they are routed only where the smallest
                   # (bottom-right) window holds fewer than k real tokens
                   all_real=k <= (h - (nwh - 1) * ws) * (w - (nww - 1) * ws))


def _route_content(
    scores: torch.Tensor, keep_ratio: float, ws: int, content: torch.Tensor
) -> Routing:
    """Padding-aware routing: budget and slots only where the input has content."""
    b, h, w = scores.shape
    dev = scores.device
    nww = math.ceil(w / ws)
    if content.shape != scores.shape:
        raise ValueError(f"content mask {tuple(content.shape)} != scores {tuple(scores.shape)}")
    content = content.bool()
    empty = ~content.flatten(1).any(1)  # an all-zero image: treat every token as content
    content = content | empty.view(b, 1, 1)
    cnt = _windowed(content.to(torch.int32), ws, 0).sum(-1)  # (B, nW) content per window
    cnt_host = cnt.tolist()  # one small sync per stage: the routed shapes depend on it
    area = ws * ws
    ks, wins = [], []
    for counts in cnt_host:
        used = [c for c in counts if c > 0]
        ks.append(_k_for_budget(used, _target(keep_ratio, sum(used)), area))
        wins.append([i for i, c in enumerate(counts) if c > 0])
    k = max(ks)
    m = max(len(x) for x in wins)
    # (B, M) routed windows; short lists are filled with their first window, whose extra
    # copies route only pad slots
    win_list = [x + [x[0]] * (m - len(x)) for x in wins]
    windows = torch.tensor(win_list, device=dev)
    dummy = torch.tensor([[j >= len(x) for j in range(m)] for x in wins], device=dev)
    kb = torch.tensor(ks, device=dev).view(b, 1, 1)

    s = _windowed(torch.where(content, scores.detach().float(), -1.0), ws, -1.0)
    s = s.gather(1, windows.unsqueeze(-1).expand(-1, -1, area))  # (B, M, area)
    top = s.topk(k, dim=-1, sorted=True)  # rank r < k_b and a content token: routed
    rank = torch.arange(k, device=dev).view(1, 1, k)
    ok = (rank < kb) & (top.values >= 0) & ~dummy.unsqueeze(-1)
    slot, order = top.indices.sort(dim=-1)
    ok = ok.gather(-1, order)
    win = windows.unsqueeze(-1)
    pos_h = (win // nww) * ws + slot // ws
    pos_w = (win % nww) * ws + slot % ws
    real = ok & (pos_h < h) & (pos_w < w)
    share = real.flatten(1).sum(1).float() / content.flatten(1).sum(1).float()
    all_real = False
    if all(len(x) == len(counts) for x, counts in zip(wins, cnt_host)):
        windows = None  # every window has content: the (cheaper) all-windows K/V path
        all_real = bool(real.all())  # e.g. a square photo: exactly the paper's routing
    return _finish(scores, slot, pos_h, pos_w, real, k, windows, share, all_real=all_real)


def _finish(
    scores: torch.Tensor,
    slot: torch.Tensor,
    pos_h: torch.Tensor,
    pos_w: torch.Tensor,
    real: torch.Tensor,
    k: int,
    windows: torch.Tensor | None,
    share: torch.Tensor,
    all_real: bool,
) -> Routing:
    b, h, w = scores.shape
    flat = pos_h * w + pos_w
    gather_idx = torch.where(real, flat, torch.zeros_like(flat)).reshape(b, -1)
    scatter_idx = torch.where(real, flat, torch.full_like(flat, h * w)).reshape(b, -1)
    sel_scores = scores.reshape(b, h * w).float().gather(1, gather_idx)
    base = torch.arange(b, device=scores.device).unsqueeze(1)
    return Routing(
        slot=slot.reshape(-1, k),
        pos_h=pos_h.reshape(b, -1),
        pos_w=pos_w.reshape(b, -1),
        real=real.reshape(b, -1),
        gather_idx=gather_idx,
        scatter_idx=scatter_idx,
        scores=sel_scores,
        score_map=scores.detach(),
        k=k,
        grid=(h, w),
        all_real=all_real,
        windows=windows,
        share=share,
        take_rows=(gather_idx + base * (h * w)).reshape(-1),
        put_rows=(scatter_idx + base * (h * w + 1)).reshape(-1),
    )
