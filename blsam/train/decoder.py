"""SAM's mask decoder over the masks of several images in one call.

segment-anything's ``MaskDecoder.predict_masks`` takes one image: it repeats that image's
embedding for every prompt. Training decodes all images' masks of a batch at once, so
``decode_masks`` mirrors ``predict_masks`` (and ``MaskDecoder.forward``'s output selection)
with the decoder's own submodules and parameters, and picks each mask's image embedding by
index instead of repeating one. Same parameters, same state-dict names, same results.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def decode_masks(decoder: nn.Module, image_embeddings: torch.Tensor, image_index: torch.Tensor,
                 image_pe: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor,
                 multimask_output: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks for N prompts over B images: ``image_embeddings`` (B, C, h, w), ``image_index``
    (N,) long, which image each prompt is on; ``image_pe`` (1, C, h, w); ``sparse`` (N, T, C)
    and ``dense`` (N, C, h, w) from the prompt encoder. Returns low-res logits (N, K, 4h, 4w)
    and predicted IoUs (N, K): K = 3 with ``multimask_output``, else 1 (SAM's selection)."""
    d = decoder
    n = sparse.shape[0]
    out_tokens = torch.cat([d.iou_token.weight, d.mask_tokens.weight], dim=0)
    tokens = torch.cat([out_tokens.unsqueeze(0).expand(n, -1, -1), sparse], dim=1)
    src = image_embeddings.index_select(0, image_index) + dense
    b, c, h, w = src.shape
    hs, src = d.transformer(src, image_pe.expand(n, -1, -1, -1), tokens)
    iou_out, mask_out = hs[:, 0, :], hs[:, 1:1 + d.num_mask_tokens, :]
    up = d.output_upscaling(src.transpose(1, 2).view(b, c, h, w))
    hyper = torch.stack([mlp(mask_out[:, k, :])
                         for k, mlp in enumerate(d.output_hypernetworks_mlps)], dim=1)
    b, c, h, w = up.shape
    masks = (hyper @ up.view(b, c, h * w)).view(b, -1, h, w)
    iou_pred = d.iou_prediction_head(iou_out)
    keep = slice(1, None) if multimask_output else slice(0, 1)
    return masks[:, keep], iou_pred[:, keep]
