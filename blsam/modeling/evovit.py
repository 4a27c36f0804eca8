"""Evo-ViT on SAM (Xu et al., 2022, "Slow-Fast Token Evolution"): dense first layers, then
half of the tokens updated per layer, the rest carried unchanged as placeholders.

On DeiT, Evo-ViT runs layers 1-4 dense, then (re-)selects at layers 5 and 9 the tokens with the
highest class attention, an exponential moving average over layers (weight ``tradeoff`` 0.5 on
the new layer; the dense layers overwrite it); only the selected tokens go through the next
blocks (attending to each other), the others wait unchanged. Its stage-wise DeiT code keeps no
"representative token" update of the placeholders, and neither do we. On SAM (see
``pruning``): the received-attention score replaces class attention, and selection is per
14x14 window, keep_ratio of each window's slots (ViT-B: 98 of 196).
"""
from __future__ import annotations

import torch

from .pruning import (
    KeptSet,
    PrunedImageEncoder,
    gather_kept,
    keep_all,
    run_kept_layer,
    scatter_kept,
    score_map_of,
    select_kept,
)


class EvoViTImageEncoder(PrunedImageEncoder):
    """Drop-in ``image_encoder`` of a SAM: (B, 3, S, S) -> (B, 256, S/16, S/16)."""

    method = "evovit"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._start(x)
        sel = self.pruning.layers
        t = self.pruning.tradeoff
        b, h, w, _ = x.shape
        stages: list[tuple[int, KeptSet]] = []
        scores: torch.Tensor | None = None  # (B, H*W) EMA of received attention
        xs: torch.Tensor | None = None
        kept: KeptSet | None = None
        for i, blk in enumerate(self.blocks):
            if i < sel[0] - 1:
                x = blk(x)
                continue
            if i == sel[0] - 1:  # last dense layer: its attention is the first score
                every = keep_all(x, self.window_size)
                xa, s = run_kept_layer(blk, gather_kept(x, every), every, (h, w), score=True)
                x = scatter_kept(x, xa, every)
                scores = score_map_of(s, every, (h, w))
                continue
            if i in sel:
                if kept is not None:
                    x = scatter_kept(x, xs, kept)
                kept = select_kept(scores.view(b, h, w), self.tokens_per_window,
                                   self.window_size)
                stages.append((i, kept))
                xs = gather_kept(x, kept)
            # scores matter only until the last (re-)selection
            xs, s = run_kept_layer(blk, xs, kept, (h, w), i < sel[-1], self.grad_checkpointing)
            if s is not None:
                scores = score_map_of(s, kept, (h, w), scores, t)
        if kept is not None:
            x = scatter_kept(x, xs, kept)
        return self._finish(x, stages)
