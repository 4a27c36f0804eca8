"""EViT on SAM (Liang et al., 2022, "Not All Patches are What You Need"): one cut.

EViT keeps, inside a block, the tokens the CLS token attends to most (after attention and its
residual, before the MLP); the MLP and every later block run on the kept tokens only. On SAM
(see ``pruning``): one cut inside the first global-attention layer (layer 3 of ViT-B, 8 of
ViT-H), scored by that layer's received attention, keep_ratio of the tokens kept. The fused
token of inattentive tokens is dropped: it has no place on the map the neck reads, belongs to
no window, and the pruned tokens already keep their (post-attention) features for the neck.
"""
from __future__ import annotations

import torch

from .pruning import (
    KeptSet,
    PrunedImageEncoder,
    gather_kept,
    keep_all,
    kept_attention,
    kept_mlp,
    run_kept_layer,
    scatter_kept,
    score_map_of,
    select_kept,
)


class EViTImageEncoder(PrunedImageEncoder):
    """Drop-in ``image_encoder`` of a SAM: (B, 3, S, S) -> (B, 256, S/16, S/16)."""

    method = "evit"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._start(x)
        cut = self.pruning.layers[0]
        b, h, w, _ = x.shape
        stages: list[tuple[int, KeptSet]] = []
        xs = kept = None
        for i, blk in enumerate(self.blocks):
            if i < cut:
                x = blk(x)
            elif i == cut:  # attention over all tokens, scored; MLP on the kept tokens
                every = keep_all(x, self.window_size)
                out, s = kept_attention(blk, gather_kept(x, every), every, (h, w), score=True)
                x = scatter_kept(x, gather_kept(x, every) + out, every)
                scores = score_map_of(s, every, (h, w)).view(b, h, w)
                kept = select_kept(scores, self.tokens_per_window, self.window_size)
                stages.append((i + 1, kept))
                xs = kept_mlp(blk, gather_kept(x, kept))
            else:
                xs, _ = run_kept_layer(blk, xs, kept, (h, w), False,
                                       self.grad_checkpointing)
        if kept is not None:
            x = scatter_kept(x, xs, kept)
        return self._finish(x, stages)
