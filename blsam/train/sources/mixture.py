"""Weighted mixtures of sources (``--data-format mixture --mixture FILE.yaml``): the members'
datasets side by side; ``sampler.MixtureBatchSampler`` draws an epoch from them by weight, as
a pure function of (seed, epoch, rank), so resume stays exact and ranks stay disjoint.

A batch may mix labelled and unlabelled images: the supervised loss is averaged over the masks
of the labelled ones only (an image without masks adds no prompt), the feature loss over all.
"""
from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


class MixtureDataset(torch.utils.data.Dataset):
    """The members' datasets one after another: index ``offsets[k] + i`` is member k's i."""

    def __init__(self, parts: Sequence[torch.utils.data.Dataset]) -> None:
        self.parts = list(parts)
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts]).tolist()

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, item: Any) -> dict[str, Any]:
        epoch, idx = item if isinstance(item, tuple) else (0, int(item))
        k = bisect.bisect_right(self.offsets, idx) - 1
        return self.parts[k][(epoch, idx - self.offsets[k])]
