"""The mask decoder's prompt inputs, computed one way for training, validation and evaluation.

``prompt_inputs`` returns what segment-anything's ``PromptEncoder`` gives the mask decoder --
sparse and dense prompt embeddings and the dense positional encoding (``get_dense_pe``) -- with
two differences that do not change fp32 results:

* **fp32 under autocast.** The prompt encoder runs with autocast disabled: its random Fourier
  features (``coords @ gaussian_matrix`` then sin/cos of 2*pi times it) lose about two digits
  in bf16 (max abs error 0.14 on the dense PE). The decoder itself still runs under the caller's
  autocast; its inputs are fp32 like SAM's.
* **No host sync.** SAM's ``_embed_points`` writes through boolean masks
  (``point_embedding[labels == -1] = 0.0`` ...), each a ``nonzero`` that waits for the device.
  ``embed_points`` computes the same values with ``torch.where`` on the label masks.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

__all__ = ["embed_points", "prompt_inputs", "fp32_region"]


def fp32_region(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off for ``device``'s type when it is on (a no-op context otherwise)."""
    kind = device.type
    if kind in ("cpu", "cuda", "xpu", "mps", "hpu") and torch.is_autocast_enabled(kind):
        return torch.autocast(kind, enabled=False)
    return contextlib.nullcontext()


def embed_points(prompt_encoder: nn.Module, points: torch.Tensor, labels: torch.Tensor,
                 pad: bool) -> torch.Tensor:
    """``PromptEncoder._embed_points`` without boolean-mask writes: (N, P(+1), C).

    ``pad``: append SAM's "not a point" (label -1), as SAM does when no box is given. Labels
    -1 get ``not_a_point_embed``, 0 and 1 add ``point_embeddings[0|1]`` to the positional
    encoding, any other label keeps the encoding alone (SAM's behaviour)."""
    pe = prompt_encoder
    points = points + 0.5  # the centre of the pixel
    if pad:
        points = torch.cat([points, points.new_zeros((points.shape[0], 1, 2))], dim=1)
        labels = torch.cat([labels, labels.new_full((labels.shape[0], 1), -1)], dim=1)
    emb = pe.pe_layer.forward_with_coords(points, pe.input_image_size)
    lab = labels.unsqueeze(-1)
    out = torch.where(lab == -1, pe.not_a_point_embed.weight.to(emb.dtype), emb)
    out = torch.where(lab == 0, emb + pe.point_embeddings[0].weight, out)
    return torch.where(lab == 1, emb + pe.point_embeddings[1].weight, out)


def prompt_inputs(prompt_encoder: nn.Module, points: tuple[torch.Tensor, torch.Tensor] | None,
                  boxes: torch.Tensor | None, masks: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sparse (N, T, C), dense (N, C, h, w), image_pe (1, C, h, w)): ``prompt_encoder(points,
    boxes, masks)`` and ``prompt_encoder.get_dense_pe()``, in the prompt encoder's dtype (fp32)
    even under autocast, without a host sync. Equal to segment-anything's values outside
    autocast (the same operations in the same order)."""
    pe = prompt_encoder
    weight = pe.no_mask_embed.weight
    with fp32_region(weight.device):
        if points is not None:
            bs = points[0].shape[0]
        elif boxes is not None:
            bs = boxes.shape[0]
        else:
            bs = 1 if masks is None else masks.shape[0]
        parts = []
        if points is not None:
            parts.append(embed_points(pe, points[0], points[1], pad=boxes is None))
        if boxes is not None:
            parts.append(pe._embed_boxes(boxes))
        if not parts:
            sparse = weight.new_empty((bs, 0, pe.embed_dim))
        else:
            sparse = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        if masks is not None:
            dense = pe._embed_masks(masks.to(pe.mask_downscaling[0].weight.dtype))
        else:
            h, w = pe.image_embedding_size
            dense = weight.reshape(1, -1, 1, 1).expand(bs, -1, h, w)
        return sparse, dense, pe.get_dense_pe()
