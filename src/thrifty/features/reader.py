"""Reading a feature cache: `CachedTapDataset`, items and whole batches of cached taps (thrifty.features.cache)."""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from thrifty.data.base import LabelledDataset
from thrifty.features.taps import MASK


if TYPE_CHECKING:
    from thrifty.features.cache import FeatureCache


class CachedTapDataset(LabelledDataset):
    """Items ({tap: (per-sample shape) tensor}, label) read from read-only memory-mapped chunk files (at most
    `max_open` mapped at once): float taps in the cache's dtype, or widened to `float_dtype` while they are copied
    out of the map (exact: fp16 -> fp32 is lossless); `mask` as bool. `get_batch` reads a whole batch with one
    copy per row (what the training loops use)."""

    def __init__(
        self,
        cache: FeatureCache,
        split: str,
        taps: Sequence[str],
        max_open: int = 64,
        float_dtype: torch.dtype | None = None,
    ):
        entry = cache.manifest["splits"][split]
        self.root, self.split, self.taps = cache.root, split, list(taps)
        self.chunk_size, self.max_open, self.float_dtype = cache.chunk_size, max_open, float_dtype
        self.files = {(int(c), t): rec["files"][t]["file"] for c, rec in entry["chunks"].items() for t in self.taps}
        self.labels = np.load(os.path.join(self.root, entry["labels"]["file"]))
        self._fingerprint = entry["fingerprint"]
        self._open: OrderedDict[tuple[int, str], torch.Tensor] = OrderedDict()

    def fingerprint(self) -> str:
        return self._fingerprint

    def _map(self, chunk: int, tap: str) -> torch.Tensor:
        """The chunk file of `tap` as a tensor over its read-only memory map, (rows in chunk, per-sample shape);
        only ever copied from (writing into it would fault)."""
        key = (chunk, tap)
        if key in self._open:
            self._open.move_to_end(key)
            return self._open[key]
        with warnings.catch_warnings():  # torch warns that the map is read-only: it is only ever copied from
            warnings.simplefilter("ignore", UserWarning)
            arr = torch.from_numpy(np.load(os.path.join(self.root, self.files[key]), mmap_mode="r"))
        self._open[key] = arr
        if len(self._open) > self.max_open:
            self._open.popitem(last=False)
        return arr

    def _dtype(self, stored: torch.dtype) -> torch.dtype:
        return self.float_dtype if self.float_dtype is not None and stored.is_floating_point else stored

    def __getitem__(self, i: int) -> tuple[dict[str, torch.Tensor], int]:
        chunk, row = divmod(int(i), self.chunk_size)
        out = {}
        for tap in self.taps:
            src = self._map(chunk, tap)[row]
            out[tap] = src.to(self._dtype(src.dtype), copy=True)
        if MASK in out:
            out[MASK] = out[MASK].bool()
        return out, int(self.labels[i])

    def get_batch(self, indices: Sequence[int]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The batch of `indices` as ({tap: (B, per-sample shape)}, (B,) int64 labels), in that order: each row is
        copied (and widened) once from its chunk map into the batch tensor; no per-item tensors to stack."""
        rows = [divmod(int(i), self.chunk_size) for i in indices]
        out = {}
        for tap in self.taps:
            first = self._map(rows[0][0], tap)
            batch = torch.empty((len(rows), *first.shape[1:]), dtype=self._dtype(first.dtype))
            for j, (chunk, row) in enumerate(rows):
                batch[j].copy_(self._map(chunk, tap)[row])
            out[tap] = batch
        if MASK in out:
            out[MASK] = out[MASK].bool()
        labels = torch.as_tensor(self.labels[np.asarray(indices, dtype=np.int64)], dtype=torch.int64)
        return out, labels

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers: re-open the maps in each process
        state = dict(self.__dict__)
        state["_open"] = OrderedDict()
        return state
