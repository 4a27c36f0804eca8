"""Token-importance prediction layer (paper §3.2: a linear layer followed by a softmax)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class TokenPredictor(nn.Module):
    """Scores every token with s in (0, 1): softmax over (keep, skip) logits, keep column.

    A LayerNorm precedes the linear layer because the residual stream of a deep ViT grows to
    large magnitudes (hundreds in SAM ViT-H); without it the softmax saturates and the scores
    (and so the gradient that reaches the predictor through alpha*s) vanish. Scores are always
    computed in fp32 -- under autocast and after a whole-model ``.to(torch.bfloat16)`` or
    ``.half()`` alike -- because top-k on rounded scores is unstable: the weights are upcast
    with the tokens (an fp32 weight is used as is, so fp32 models pay nothing).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc = nn.Linear(dim, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C) -> scores (B, H, W), fp32."""
        # meta tensors (FLOP counting) have no autocast state of their own
        device_type = "cpu" if x.device.type == "meta" else x.device.type
        with torch.autocast(device_type=device_type, enabled=False):
            x = x.float()
            if self.fc.weight.dtype == torch.float32:  # as modules: FLOP hooks see them
                logits = self.fc(self.norm(x))
            else:  # the model was cast to bf16/fp16: run this layer with upcast weights
                n, fc = self.norm, self.fc
                xn = F.layer_norm(x, n.normalized_shape, n.weight.float(), n.bias.float(), n.eps)
                logits = F.linear(xn, fc.weight.float(), fc.bias.float())
            return logits.softmax(dim=-1)[..., 0]
