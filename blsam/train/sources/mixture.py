"""Weighted mixtures of sources (``--data-format mixture --mixture FILE.yaml``).

An epoch is ``epoch_size`` samples (default: every member's images once in total), split
among the members by weight exactly (largest remainders), so the shares are the weights up to
one sample per epoch. Member k's samples are its own seeded permutations, chained as often as
its share needs (an image repeats only after all of the member's images have come), and the
epoch's samples are shuffled together; the result is then split among ranks like
``EpochBatchSampler``'s. Everything is a pure function of (seed, epoch, rank): resume stays
exact, ranks stay disjoint, and the samples each member contributed up to any data position
can be counted afterwards (``seen``), for the log and summary.json.

A batch may mix labelled and unlabelled images: the supervised loss is averaged over the masks
of the labelled ones only (an image without masks adds no prompt), the feature loss over all.
"""
from __future__ import annotations

import bisect
import math
from typing import Any, Dict, List, Sequence

import numpy as np
import torch

from ..data import EpochBatchSampler


def allocate(weights: Sequence[float], total: int) -> List[int]:
    """``total`` split in proportion to ``weights`` (largest remainders; ties to the first)."""
    s = float(sum(weights))
    exact = [w / s * total for w in weights]
    counts = [int(math.floor(x)) for x in exact]
    order = sorted(range(len(weights)), key=lambda k: (-(exact[k] - counts[k]), k))
    for k in order[:total - sum(counts)]:
        counts[k] += 1
    return counts


class MixtureDataset(torch.utils.data.Dataset):
    """The members' datasets one after another: index ``offsets[k] + i`` is member k's i."""

    def __init__(self, parts: Sequence[torch.utils.data.Dataset]) -> None:
        self.parts = list(parts)
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts]).tolist()

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, item: Any) -> Dict[str, Any]:
        epoch, idx = item if isinstance(item, tuple) else (0, int(item))
        k = bisect.bisect_right(self.offsets, idx) - 1
        return self.parts[k][(epoch, idx - self.offsets[k])]


class MixtureBatchSampler(EpochBatchSampler):
    """``EpochBatchSampler`` whose epoch order draws members by weight (module docstring)."""

    def __init__(self, sizes: Sequence[int], weights: Sequence[float], batch_size: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0,
                 epoch_size: int = 0) -> None:
        self.sizes = [int(n) for n in sizes]
        self.offsets = np.cumsum([0] + self.sizes).tolist()
        self.counts = allocate(weights, int(epoch_size or sum(self.sizes)))
        super().__init__(sum(self.counts), batch_size, rank, world_size, seed)

    def epoch_order(self, epoch: int) -> List[int]:
        out: List[np.ndarray] = []
        for k, (size, count) in enumerate(zip(self.sizes, self.counts)):
            rounds = [np.random.default_rng([self.seed, epoch, k, r]).permutation(size)
                      for r in range(math.ceil(count / size) if count else 0)]
            if rounds:
                out.append(np.concatenate(rounds)[:count] + self.offsets[k])
        order = np.concatenate(out) if out else np.zeros(0, np.int64)
        return order[np.random.default_rng([self.seed, epoch]).permutation(len(order))].tolist()

    def member_of(self, idx: int) -> int:
        return bisect.bisect_right(self.offsets, idx) - 1

    def seen(self, epoch: int, batch_in_epoch: int) -> List[int]:
        """Samples each member gave every rank together from the start up to the data
        position (epoch, batch_in_epoch)."""
        counts = [0] * len(self.sizes)
        for e in range(epoch + 1):
            limit = self.per_rank if e < epoch else batch_in_epoch * self.batch_size
            for r in range(self.world):
                for i in self.rank_indices(e, r)[:limit]:
                    counts[self.member_of(i)] += 1
        return counts
