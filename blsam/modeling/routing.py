"""Per-window top-k token routing (paper §4.1: "token selection occurs within each window").

Every 14x14 window of the padded token grid routes the same number k of tokens, so the routed
set is a dense (B, windows, k) tensor that batches without Python loops. k is chosen so that
``keep_ratio`` of the image's *real* tokens are routed: k = ceil(r * N_real / n_windows)
(41 at 1024 px and r = 0.25), not r * window area (49, which would route 30%).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn.functional as F


def tokens_per_window(keep_ratio: float, grid: Tuple[int, int], window_size: int) -> int:
    """k routed tokens per window; keep_ratio >= 1 routes every slot (pad slots included)."""
    h, w = grid
    area = window_size * window_size
    if keep_ratio >= 1.0:
        return area
    n_windows = math.ceil(h / window_size) * math.ceil(w / window_size)
    return max(1, min(area, math.ceil(keep_ratio * h * w / n_windows)))


@dataclass
class Routing:
    """Which tokens a predictor stage routes to the P-blocks.

    All index tensors have shape (B, n_windows * k) in window-major order, except ``slot``.
    """

    slot: torch.Tensor  # (B*nW, k) position inside the window (row-major), for window layers
    pos_h: torch.Tensor  # (B, n) row in the padded grid
    pos_w: torch.Tensor  # (B, n) column in the padded grid
    real: torch.Tensor  # (B, n) bool: a real token (False: a pad slot, output discarded)
    gather_idx: torch.Tensor  # (B, n) flat H*W index; pad slots point at 0 (masked by `real`)
    scatter_idx: torch.Tensor  # (B, n) flat index into H*W+1 rows; pad slots hit the last row
    scores: torch.Tensor  # (B, n) fp32 scores of the routed tokens (carries gradient)
    score_map: torch.Tensor  # (B, H, W) all scores, detached
    k: int
    grid: Tuple[int, int]  # (H, W) real token grid
    all_real: bool = False  # no pad slot routed: fusion can scatter in place, no trash row

    @property
    def mask(self) -> torch.Tensor:
        """(B, H, W) bool map of routed real tokens (for visualisation and tests)."""
        b = self.real.shape[0]
        h, w = self.grid
        m = torch.zeros(b, h * w + 1, dtype=torch.bool, device=self.real.device)
        m.scatter_(1, self.scatter_idx, torch.ones_like(self.scatter_idx, dtype=torch.bool))
        return m[:, : h * w].view(b, h, w)


def route_tokens(scores: torch.Tensor, keep_ratio: float, window_size: int) -> Routing:
    """Select the top-k scored tokens in every window of the padded grid.

    Pad slots get score -1 (real scores are in (0, 1)), so they are only chosen when a window
    has fewer than k real tokens; they are then computed and discarded.
    """
    b, h, w = scores.shape
    ws = window_size
    hp, wp = math.ceil(h / ws) * ws, math.ceil(w / ws) * ws
    nwh, nww = hp // ws, wp // ws
    k = tokens_per_window(keep_ratio, (h, w), ws)
    dev = scores.device

    if k >= ws * ws:
        slot = torch.arange(ws * ws, device=dev).expand(b, nwh * nww, ws * ws)
    else:
        s = F.pad(scores.detach(), (0, wp - w, 0, hp - h), value=-1.0)
        s = s.view(b, nwh, ws, nww, ws).permute(0, 1, 3, 2, 4).reshape(b, nwh * nww, ws * ws)
        # sorted slots keep memory access monotone inside a window
        slot = s.topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values
    win = torch.arange(nwh * nww, device=dev).view(1, -1, 1)
    pos_h = (win // nww) * ws + slot // ws
    pos_w = (win % nww) * ws + slot % ws
    real = (pos_h < h) & (pos_w < w)
    flat = pos_h * w + pos_w
    gather_idx = torch.where(real, flat, torch.zeros_like(flat)).reshape(b, -1)
    scatter_idx = torch.where(real, flat, torch.full_like(flat, h * w)).reshape(b, -1)
    sel_scores = scores.reshape(b, h * w).float().gather(1, gather_idx)
    return Routing(
        slot=slot.reshape(b * nwh * nww, k),
        pos_h=pos_h.reshape(b, -1),
        pos_w=pos_w.reshape(b, -1),
        real=real.reshape(b, -1),
        gather_idx=gather_idx,
        scatter_idx=scatter_idx,
        scores=sel_scores,
        score_map=scores.detach(),
        k=k,
        grid=(h, w),
        # decided from shapes alone (no device sync): pads rank last, so they are routed
        # only where the smallest (bottom-right) window holds fewer than k real tokens
        all_real=k <= (h - (nwh - 1) * ws) * (w - (nww - 1) * ws),
    )
