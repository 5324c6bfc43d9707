"""Seeded batches that are identical whether one process or N data-parallel processes train.

Epoch e shuffles with seed (seed, e); global batch k is perm[k*B:(k+1)*B]; in DDP rank r takes the r-th equal
slice of every global batch, so the averaged gradient equals the single-process one. A final batch too small to
give every rank a sample is dropped, so all ranks run the same number of steps.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class GlobalBatchSampler(Sampler[list[int]]):
    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.rank, self.world_size, self.epoch = rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> list[int]:
        """This epoch's sample order (every index once; subclasses may repeat or drop indices)."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            return torch.randperm(self.n, generator=g).tolist()
        return list(range(self.n))

    def _batches(self) -> list[list[int]]:
        order = self.order()
        self.n = len(order)
        out = []
        for start in range(0, self.n, self.batch_size):
            batch = order[start : start + self.batch_size]
            if len(batch) < self.world_size:
                break
            per = [len(batch) // self.world_size + (r < len(batch) % self.world_size) for r in range(self.world_size)]
            lo = sum(per[: self.rank])
            out.append(batch[lo : lo + per[self.rank]])
        return out

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())
