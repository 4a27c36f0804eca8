"""Batch samplers whose batches are pure functions of (seed, epoch, rank): a resumed run sees
exactly the batches the uninterrupted one saw, and ranks take disjoint positions of one order.

``EpochBatchSampler``: DistributedSampler-style over one dataset. ``MixtureBatchSampler``:
an epoch of a weighted mixture (``sources.mixture``): ``epoch_size`` samples split among the
members by weight exactly (largest remainders), so the shares are the weights up to one sample
per epoch; member k's samples are its own seeded permutations chained as often as its share
needs (every image of a member comes equally often, +-1), shuffled together, then split among
ranks as ``EpochBatchSampler`` does. ``seen`` counts what each member gave up to a position.
"""
from __future__ import annotations

import bisect
import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch


class EpochBatchSampler(torch.utils.data.Sampler):
    """DistributedSampler-style per-rank split that yields batches of ``(epoch, index)``.

    The epoch's permutation depends only on (seed, epoch); it is padded (by wrapping) to a
    multiple of world_size, so every rank has the same number of batches. ``start_batch``
    resumes in the middle of an epoch.
    """

    def __init__(self, n: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True) -> None:
        self.n, self.batch_size, self.rank, self.world = n, batch_size, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.start_batch = 0, 0
        self.per_rank = math.ceil(n / world_size)

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def epoch_order(self, epoch: int) -> list[int]:
        """The epoch's ``n`` dataset indices before the rank split (a mixture overrides it)."""
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def rank_indices(self, epoch: int, rank: int | None = None) -> list[int]:
        """This rank's (or ``rank``'s) indices of the epoch."""
        perm = self.epoch_order(epoch)
        total = self.per_rank * self.world
        perm = (perm * math.ceil(total / self.n))[:total]
        return perm[self.rank if rank is None else rank::self.world]

    def __len__(self) -> int:
        """Batches per epoch (the same on every rank; the last one may be short)."""
        return math.ceil(self.per_rank / self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        idx = self.rank_indices(self.epoch)
        for b in range(self.start_batch, len(self)):
            yield [(self.epoch, i) for i in idx[b * self.batch_size:(b + 1) * self.batch_size]]


def allocate(weights: Sequence[float], total: int) -> list[int]:
    """``total`` split in proportion to ``weights`` (largest remainders; ties to the first)."""
    s = float(sum(weights))
    exact = [w / s * total for w in weights]
    counts = [int(math.floor(x)) for x in exact]
    order = sorted(range(len(weights)), key=lambda k: (-(exact[k] - counts[k]), k))
    for k in order[:total - sum(counts)]:
        counts[k] += 1
    return counts


class MixtureBatchSampler(EpochBatchSampler):
    """``EpochBatchSampler`` whose epoch order draws members by weight (module docstring)."""

    def __init__(self, sizes: Sequence[int], weights: Sequence[float], batch_size: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0,
                 epoch_size: int = 0) -> None:
        self.sizes = [int(n) for n in sizes]
        self.offsets = np.cumsum([0] + self.sizes).tolist()
        self.counts = allocate(weights, int(epoch_size or sum(self.sizes)))
        super().__init__(sum(self.counts), batch_size, rank, world_size, seed)

    def epoch_order(self, epoch: int) -> list[int]:
        out: list[np.ndarray] = []
        for k, (size, count) in enumerate(zip(self.sizes, self.counts)):
            rounds = [np.random.default_rng([self.seed, epoch, k, r]).permutation(size)
                      for r in range(math.ceil(count / size) if count else 0)]
            if rounds:
                out.append(np.concatenate(rounds)[:count] + self.offsets[k])
        order = np.concatenate(out) if out else np.zeros(0, np.int64)
        return order[np.random.default_rng([self.seed, epoch]).permutation(len(order))].tolist()

    def member_of(self, idx: int) -> int:
        return bisect.bisect_right(self.offsets, idx) - 1

    def seen(self, epoch: int, batch_in_epoch: int) -> list[int]:
        """Samples each member gave every rank together from the start up to the data
        position (epoch, batch_in_epoch)."""
        counts = np.zeros(len(self.sizes), np.int64)
        for e in range(epoch + 1):
            limit = self.per_rank if e < epoch else batch_in_epoch * self.batch_size
            # rank r takes column r of the padded order laid out (per_rank, world)
            padded = np.resize(np.asarray(self.epoch_order(e)), self.per_rank * self.world)
            taken = padded.reshape(self.per_rank, self.world)[:limit].reshape(-1)
            members = np.searchsorted(self.offsets, taken, side="right") - 1
            counts += np.bincount(members, minlength=len(self.sizes))
        return counts.tolist()
