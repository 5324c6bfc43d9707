"""Class-balanced sampling (the re-sampling baseline; cRT's and MiSLAS/BTM stage 2's `ClassAwareSampler`).

Decoupling/MiSLAS `ClassAwareSampler` (num_samples_cls=1): classes are visited in shuffled cycles (each class once
per C draws, reshuffled every cycle) and each class yields its samples in shuffled cycles, so every class is drawn
equally often whatever its size. Differences, stated: the draws are re-seeded per (seed, epoch) instead of carried
by persistent iterators (so a resumed run draws the same batches), and an epoch has `num_samples` draws: the
training-set size N by default (each epoch costs what an instance-balanced epoch costs), or `C * max_c n_c`
(Decoupling's length) with `epoch_length="max"`. Batches are sliced across torchrun ranks as GlobalBatchSampler.
"""

from __future__ import annotations

import numpy as np

from thrifty.data.sampler import GlobalBatchSampler
from thrifty.errors import ConfigError


class ClassBalancedSampler(GlobalBatchSampler):
    def __init__(
        self,
        labels,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        num_classes: int | None = None,
        epoch_length: str = "data",
    ):
        self.labels = np.asarray(labels, np.int64)
        k = int(num_classes or self.labels.max() + 1)
        self.by_class = [np.flatnonzero(self.labels == c) for c in range(k)]
        self.present = [c for c in range(k) if len(self.by_class[c])]
        if epoch_length not in ("data", "max"):
            raise ConfigError(f"epoch_length must be 'data' or 'max', got {epoch_length!r}")
        self.draws = len(self.labels) if epoch_length == "data" else len(self.present) * max(map(len, self.by_class))
        super().__init__(self.draws, batch_size, seed, True, rank, world_size)

    def order(self) -> list[int]:
        rng = np.random.default_rng([self.seed, self.epoch, 6700417])
        cycles = -(-self.draws // len(self.present))
        classes = np.concatenate([rng.permutation(self.present) for _ in range(cycles)])[: self.draws]
        need = np.bincount(classes, minlength=len(self.by_class))
        streams = {}
        for c in self.present:
            ix, reps = self.by_class[c], -(-int(need[c]) // len(self.by_class[c]))
            streams[c] = np.concatenate([rng.permutation(ix) for _ in range(max(1, reps))])
        pos = dict.fromkeys(self.present, 0)
        out = []
        for c in classes.tolist():
            out.append(int(streams[c][pos[c]]))
            pos[c] += 1
        return out
