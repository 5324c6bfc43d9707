"""One dataset abstraction for every source: samples + labels + a split protocol.

A `TaskData` holds named splits (torch Datasets yielding `(inputs, label)`), `num_classes` and the protocol that
says which split trains, which tunes and which reports:

- protocol "1k" (VTAB-1K): train on `train800val200`, report `test`; tune on `train800`, select on `val200`.
- protocol "full": train on `train`, report `test`, tune/select on `val` when present.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data._utils.collate import default_collate

from thrifty.backbones.preprocess import ImagePreprocess, TextPreprocess
from thrifty.errors import DataError


PROTOCOLS = {
    "1k": {"train": "train800val200", "test": "test", "tune_train": "train800", "val": "val200"},
    "full": {"train": "train", "test": "test", "tune_train": "train", "val": "val"},
}


class LabelledDataset(Dataset):
    """Base: `labels` is an int64 array; `__getitem__` returns `(inputs, label)`."""

    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Sequence[int]) -> LabelledDataset:
        return Subset(self, np.asarray(indices, dtype=np.int64))

    def get_batch(self, indices: Sequence[int]) -> Any:
        """The collated batch `(inputs, labels)` of `indices`: torch's default collation of the items. Datasets that
        can read a batch at once override it (thrifty.features.cache: one copy per row, no per-item tensors)."""
        return default_collate([self[int(i)] for i in indices])

    def fingerprint(self) -> str:
        """Identifies the samples (not the preprocessing): used by feature caches."""
        import hashlib

        return hashlib.sha256(np.ascontiguousarray(self.labels).tobytes() + self._sample_key()).hexdigest()[:16]

    def _sample_key(self) -> bytes:
        return str(len(self)).encode()


class Subset(LabelledDataset):
    def __init__(self, base: LabelledDataset, indices: np.ndarray):
        self.base, self.indices = base, indices
        self.labels = base.labels[indices]

    def __getitem__(self, i: int) -> tuple[Any, int]:
        return self.base[int(self.indices[i])]

    def get_batch(self, indices: Sequence[int]) -> Any:
        return self.base.get_batch([int(self.indices[i]) for i in indices])

    def _sample_key(self) -> bytes:
        return self.base._sample_key() + self.indices.tobytes()


class _BatchReader(Dataset):
    """Indexed by a list of indices: `dataset.get_batch(indices)`."""

    def __init__(self, dataset: LabelledDataset):
        self.dataset = dataset

    def __getitem__(self, indices: Sequence[int]) -> Any:
        return self.dataset.get_batch(indices)


def batch_loader(dataset: LabelledDataset, batches: Sampler[list[int]], num_workers: int = 0) -> DataLoader:
    """A DataLoader yielding `(inputs, labels)` for each index list of `batches`, read by `dataset.get_batch`
    (the same batches as `DataLoader(dataset, batch_sampler=batches)`, and a batch-at-once read where the dataset
    has one)."""
    return DataLoader(_BatchReader(dataset), sampler=batches, batch_size=None, num_workers=num_workers)


class ArrayImageDataset(LabelledDataset):
    """Images held as a uint8 array (N, H, W[, C]); resized/normalized on access with the backbone's preprocess."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, preprocess: ImagePreprocess, source: str = ""):
        if len(images) != len(labels):
            raise DataError(f"{source}: {len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.preprocess, self.source = (
            images,
            np.asarray(labels, np.int64),
            preprocess,
            source,
        )

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.preprocess.from_uint8(self.images[i : i + 1])[0], int(self.labels[i])

    def _sample_key(self) -> bytes:
        return self.source.encode() + str(self.images.shape).encode()


class FileImageDataset(LabelledDataset):
    """Images on disk (VTAB-1K, image folders); a missing or unreadable file raises DataError naming it."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int], preprocess: ImagePreprocess):
        self.paths, self.labels, self.preprocess = list(paths), np.asarray(labels, np.int64), preprocess

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image, UnidentifiedImageError

        path = self.paths[i]
        try:
            with Image.open(path) as img:
                return self.preprocess.from_pil(img), int(self.labels[i])
        except FileNotFoundError as exc:
            raise DataError(f"image {path} is missing; re-create the dataset folder or fix the split file") from exc
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"image {path} is unreadable ({exc}); replace or remove it") from exc

    def _sample_key(self) -> bytes:
        return "\n".join(os.path.relpath(p, os.path.dirname(os.path.dirname(p))) for p in self.paths).encode()


class TextDataset(LabelledDataset):
    """Texts tokenized once, up front, with the backbone's tokenizer; items are ({input_ids, attention_mask}, y)."""

    def __init__(self, texts: Sequence[str], labels: Sequence[int], preprocess: TextPreprocess, source: str = ""):
        if len(texts) != len(labels):
            raise DataError(f"{source}: {len(texts)} texts but {len(labels)} labels")
        self.texts, self.labels, self.preprocess, self.source = (
            list(texts),
            np.asarray(labels, np.int64),
            preprocess,
            source,
        )
        self._enc: dict[str, torch.Tensor] | None = None

    def _encoded(self) -> dict[str, torch.Tensor]:
        if self._enc is None:
            self._enc = self.preprocess(self.texts) if self.texts else {}
        return self._enc

    def __getitem__(self, i: int) -> tuple[dict[str, torch.Tensor], int]:
        enc = self._encoded()
        return {k: v[i] for k, v in enc.items()}, int(self.labels[i])

    def _sample_key(self) -> bytes:
        import hashlib

        return self.source.encode() + hashlib.sha256("\x00".join(self.texts).encode()).digest()


class TensorDictDataset(LabelledDataset):
    """Samples already as tensors: `inputs` maps names to (N, ...) tensors (e.g. input_ids, attention_mask), items
    are ({name: row}, label); labels default to zeros (tasks whose objective reads only the inputs)."""

    def __init__(self, inputs: dict[str, torch.Tensor], labels: Sequence[int] | None = None, source: str = ""):
        n = len(next(iter(inputs.values())))
        if any(len(v) != n for v in inputs.values()):
            raise DataError(f"{source}: the input tensors have different lengths")
        self.inputs, self.source = inputs, source
        self.labels = np.zeros(n, np.int64) if labels is None else np.asarray(labels, np.int64)

    def __getitem__(self, i: int) -> tuple[dict[str, torch.Tensor], int]:
        return {k: v[i] for k, v in self.inputs.items()}, int(self.labels[i])

    def get_batch(self, indices: Sequence[int]) -> Any:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return {k: v[idx] for k, v in self.inputs.items()}, torch.as_tensor(self.labels[idx.numpy()])

    def _sample_key(self) -> bytes:
        import hashlib

        h = hashlib.sha256(self.source.encode())
        for k in sorted(self.inputs):
            h.update(k.encode() + self.inputs[k].numpy().tobytes())
        return h.digest()


@dataclass
class TaskData:
    """A task: named splits, class count, and the protocol that maps roles (train/test/val) to splits."""

    name: str
    splits: dict[str, LabelledDataset]
    num_classes: int | None  # None: no class labels (language modelling); labels are then ignored
    protocol: str = "full"
    meta: dict[str, Any] = field(default_factory=dict)
    objective: str | None = None  # the objective this data calls for by default (None: classification)

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise DataError(f"unknown protocol {self.protocol!r}; use one of {sorted(PROTOCOLS)}")
        for split, ds in self.splits.items():
            if len(ds) == 0:
                raise DataError(f"{self.name}: split {split!r} is empty")
            if self.num_classes is None:
                continue
            bad = (ds.labels < 0) | (ds.labels >= self.num_classes)
            if bad.any():
                raise DataError(
                    f"{self.name}: split {split!r} has labels outside [0, {self.num_classes}): "
                    f"{sorted(set(ds.labels[bad].tolist()))[:5]}; fix the labels or num_classes"
                )

    def split(self, role: str) -> LabelledDataset:
        """The split playing `role` ('train', 'test', 'tune_train', 'val') under this task's protocol."""
        name = PROTOCOLS[self.protocol][role]
        if name not in self.splits:
            raise DataError(f"{self.name}: no {name!r} split for role {role!r} (protocol {self.protocol})")
        return self.splits[name]

    def has(self, role: str) -> bool:
        return PROTOCOLS[self.protocol][role] in self.splits

    def describe(self) -> dict[str, Any]:
        return {
            "data": self.name,
            "protocol": self.protocol,
            "num_classes": self.num_classes,
            "objective": self.objective,
            "split_sizes": {k: len(v) for k, v in self.splits.items()},
            **self.meta,
        }
