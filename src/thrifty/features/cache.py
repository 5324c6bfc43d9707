"""Feature cache: run the frozen backbone once over a dataset split and keep the taps a side method reads.

Layout (one directory per backbone + data + tap set):

    DIR/manifest.json                      identity (backbone, checkpoint hash, preprocessing, data, taps, dtype)
                                           and, per split, size, dataset fingerprint and per-chunk checksums
    DIR/<split>/labels.npy
    DIR/<split>/<tap>/<chunk:05d>.npy      rows [c * chunk_size, (c + 1) * chunk_size) of that tap, memory-mapped

Every file is written to a temporary name and renamed (atomic); the manifest records a chunk only after its
files are in place, so an interrupted extraction resumes at the first chunk not recorded. A chunk whose file is
missing, has the wrong size or the wrong checksum is re-extracted by `extract_features` and refused (never read)
by `FeatureCache.dataset`. A cache made with another backbone, weights, preprocessing, data or taps is refused
with a `CacheMismatchError` naming the difference.
"""

from __future__ import annotations

import datetime as _dt
import os
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from thrifty.backbones import Backbone
from thrifty.data.base import LabelledDataset, TaskData
from thrifty.errors import DataError
from thrifty.features.reader import CachedTapDataset
from thrifty.features.taps import MASK, canonical_taps, extract_taps
from thrifty.io import atomic_write, read_json, write_json


MANIFEST = "manifest.json"
FORMAT_VERSION = 1
DTYPES = ("float32", "float16")
BatchSource = Callable[[LabelledDataset, int, int], Iterable[dict[str, torch.Tensor]]]


class CacheMismatchError(DataError):
    """The cache was made for another backbone, weights, preprocessing, data or tap set."""


class CorruptCacheError(DataError):
    """A cache file is missing, truncated or fails its checksum."""


def file_checksum(path: str, algorithm: str = "crc32") -> str:
    """Checksum of a file's bytes: `crc32` (zlib, fast; detects truncation and bit rot) or any hashlib name."""
    if algorithm == "crc32":
        value = 0
        with open(path, "rb") as fh:
            while block := fh.read(1 << 22):
                value = zlib.crc32(block, value)
        return f"{value:08x}"
    import hashlib

    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _identity(backbone: Backbone, task: TaskData) -> dict[str, Any]:
    return {
        "backbone": {
            "name": backbone.name,
            "checkpoint_hash": backbone.checkpoint_hash,
            "num_blocks": len(backbone.blocks),
            "num_features": backbone.num_features,
        },
        "preprocess": backbone.preprocess.describe(),
        "data": {"name": task.name, "num_classes": task.num_classes, "protocol": task.protocol},
    }


class FeatureCache:
    """A cache directory and its manifest. Build or complete one with `extract_features`."""

    def __init__(self, root: str, manifest: dict[str, Any]):
        self.root, self.manifest = root, manifest
        self._verified: set[tuple[str, int]] = set()
        self._written = 0  # bytes of the files this object wrote
        self.estimate = None  # what extract_features estimated before it wrote (thrifty.features.budget)

    # --- opening -----------------------------------------------------------------------------------------
    @classmethod
    def open(cls, root: str) -> FeatureCache:
        path = os.path.join(root, MANIFEST)
        if not os.path.isfile(path):
            raise DataError(f"{root} is not a feature cache (no {MANIFEST}); create it with `thrifty extract`")
        manifest = read_json(path)
        if manifest.get("format_version") != FORMAT_VERSION:
            raise CacheMismatchError(
                f"{root}: cache format {manifest.get('format_version')} is not {FORMAT_VERSION}; extract it again"
            )
        return cls(root, manifest)

    @classmethod
    def create_or_open(
        cls,
        root: str,
        backbone: Backbone,
        task: TaskData,
        taps: Sequence[str],
        *,
        dtype: str | None = None,
        chunk_size: int = 256,
        checksum: str = "crc32",
    ) -> FeatureCache:
        """Open the cache in `root` after checking it fits (backbone, data, taps ⊆ cached), or start a new one."""
        taps = canonical_taps(taps, len(backbone.blocks))
        if os.path.isfile(os.path.join(root, MANIFEST)):
            cache = cls.open(root)
            cache.check(backbone, task, taps)
            if dtype is not None and dtype != cache.dtype:
                raise CacheMismatchError(f"{root} stores {cache.dtype}, not {dtype}; use another directory")
            return cache
        if dtype is not None and dtype not in DTYPES:
            raise DataError(f"cache dtype must be one of {DTYPES}, got {dtype!r}")
        if chunk_size <= 0:
            raise DataError(f"`chunk_size` must be positive, got {chunk_size}")
        from thrifty.version import __version__

        manifest = {
            "format_version": FORMAT_VERSION,
            "thrifty_version": __version__,
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            **_identity(backbone, task),
            "taps": taps,
            "dtype": dtype or "float32",
            "chunk_size": int(chunk_size),
            "checksum": checksum,
            "splits": {},
        }
        cache = cls(root, manifest)
        cache._save()
        return cache

    @property
    def taps(self) -> list[str]:
        return list(self.manifest["taps"])

    @property
    def dtype(self) -> str:
        return self.manifest["dtype"]

    @property
    def chunk_size(self) -> int:
        return int(self.manifest["chunk_size"])

    def _save(self) -> None:
        write_json(os.path.join(self.root, MANIFEST), self.manifest)

    def check(self, backbone: Backbone, task: TaskData, taps: Sequence[str]) -> None:
        """Raise CacheMismatchError unless this cache was made from `backbone` on `task` and holds `taps`."""
        want, have = _identity(backbone, task), self.manifest
        for key, what, fix in (
            ("backbone", "backbone or weights", "pass the backbone and --checkpoint it was extracted with"),
            ("preprocess", "preprocessing", "use the same --image-size / --max-length"),
            ("data", "data", "pass the same --data"),
        ):
            if have.get(key) != want[key]:
                raise CacheMismatchError(
                    f"feature cache {self.root} was made with another {what}: cached {have.get(key)}, "
                    f"asked {want[key]}; {fix}, or extract into a new directory"
                )
        missing = [t for t in canonical_taps(taps, len(backbone.blocks)) if t not in self.taps]
        if missing:
            raise CacheMismatchError(
                f"feature cache {self.root} holds taps {self.taps} but the method reads {missing} too; "
                "extract into a new directory with the method's taps (thrifty extract --method ...)"
            )
        for split, entry in have["splits"].items():
            if split in task.splits and entry["fingerprint"] != task.splits[split].fingerprint():
                raise CacheMismatchError(
                    f"feature cache {self.root}: split {split!r} was extracted from other samples (fingerprint "
                    f"{entry['fingerprint']} != {task.splits[split].fingerprint()}); check --data, --test-size "
                    "and the split seed"
                )

    # --- verification --------------------------------------------------------------------------------------
    def _path(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def _file_ok(self, rec: dict[str, Any]) -> bool:
        path = self._path(rec["file"])
        if not os.path.isfile(path) or os.path.getsize(path) != rec["bytes"]:
            return False
        return file_checksum(path, self.manifest["checksum"]) == rec["checksum"]

    def bad_chunks(self, split: str) -> list[int]:
        """Chunks of `split` that are not recorded, or whose files are missing, truncated or corrupt."""
        entry = self.manifest["splits"].get(split)
        if entry is None:
            raise DataError(f"feature cache {self.root} has no split {split!r}; extract it first")
        bad = []
        for c in range(entry["num_chunks"]):
            if (split, c) in self._verified:
                continue
            rec = entry["chunks"].get(str(c))
            if rec is not None and all(self._file_ok(rec["files"][t]) for t in self.taps):
                self._verified.add((split, c))
            else:
                bad.append(c)
        return bad

    def labels_ok(self, split: str) -> bool:
        return self._file_ok(self.manifest["splits"][split]["labels"])

    # --- extraction -----------------------------------------------------------------------------------------
    def extract_split(
        self,
        backbone: Backbone,
        split: str,
        dataset: LabelledDataset,
        *,
        batch_size: int = 64,
        device: torch.device | str = "cpu",
        amp: bool = False,
        progress: bool = False,
        batches: BatchSource | None = None,
    ) -> dict[str, Any]:
        """Extract every chunk of `split` that is missing or bad; returns {'split', 'samples', 'extracted'}.

        `batches(dataset, start, stop)` yields the tap dicts of rows [start, stop) in order; default: the local
        `backbone` (a feature server's client passes its own, thrifty.serve)."""
        written = self._written
        entry = self.manifest["splits"].get(split)
        if entry is None:
            entry = self._new_split(split, dataset)
        elif entry["fingerprint"] != dataset.fingerprint():
            raise CacheMismatchError(f"feature cache {self.root}: split {split!r} was extracted from other samples")
        elif not self.labels_ok(split):  # same samples (fingerprint), so the labels can be written again
            entry["labels"] = self._write_labels(split, dataset)
        todo = self.bad_chunks(split)
        if batches is None:
            batches = local_source(backbone, self.taps, batch_size=batch_size, device=device, amp=amp)
        for c in tqdm(todo, desc=f"extract {split}", disable=not progress or not todo, leave=False):
            self._extract_chunk(split, dataset, c, batches)
        entry["complete"] = True
        self._save()
        return {
            "split": split,
            "samples": entry["size"],
            "chunks": entry["num_chunks"],
            "extracted": len(todo),
            "bytes_written": self._written - written,
        }

    def bytes(self) -> int:
        """Bytes of the files the manifest records (chunks and labels of every split; manifest.json aside)."""
        total = 0
        for entry in self.manifest["splits"].values():
            total += entry["labels"]["bytes"]
            total += sum(f["bytes"] for rec in entry["chunks"].values() for f in rec["files"].values())
        return total

    def _write_labels(self, split: str, dataset: LabelledDataset) -> dict[str, Any]:
        rel = os.path.join(split, "labels.npy")
        _write_npy(self._path(rel), np.asarray(dataset.labels, np.int64))
        rec = self._record(rel)
        self._written += rec["bytes"]
        return rec

    def _new_split(self, split: str, dataset: LabelledDataset) -> dict[str, Any]:
        entry = {
            "size": len(dataset),
            "fingerprint": dataset.fingerprint(),
            "num_chunks": -(-len(dataset) // self.chunk_size),
            "labels": self._write_labels(split, dataset),
            "chunks": {},
            "complete": False,
        }
        self.manifest["splits"][split] = entry
        self._save()
        return entry

    def _record(self, rel: str) -> dict[str, Any]:
        path = self._path(rel)
        return {
            "file": rel,
            "bytes": os.path.getsize(path),
            "checksum": file_checksum(path, self.manifest["checksum"]),
        }

    def _extract_chunk(self, split: str, dataset: LabelledDataset, c: int, batches: BatchSource) -> None:
        start = c * self.chunk_size
        stop = min(len(dataset), start + self.chunk_size)
        tmp: dict[str, tuple[str, np.memmap]] = {}
        try:
            pos = 0
            for taps in batches(dataset, start, stop):
                if sorted(taps) != sorted(self.taps):
                    raise DataError(f"feature source gave taps {sorted(taps)}, the cache stores {self.taps}")
                for name, t in taps.items():
                    arr = _to_numpy(t, name, self.dtype)
                    if name not in tmp:
                        fd, path = tempfile.mkstemp(prefix=f".{c:05d}.", suffix=".tmp", dir=self._tap_dir(split, name))
                        os.close(fd)
                        shape = (stop - start, *arr.shape[1:])
                        tmp[name] = (path, np.lib.format.open_memmap(path, "w+", arr.dtype, shape))
                    tmp[name][1][pos : pos + len(arr)] = arr
                pos += len(arr)
            if pos != stop - start:
                raise DataError(f"feature source gave {pos} rows for chunk {c} of {split!r}, expected {stop - start}")
            files = {}
            for name, (path, mm) in tmp.items():
                mm.flush()
                del mm
                with open(path, "rb") as fh:
                    os.fsync(fh.fileno())
                rel = os.path.join(split, name, f"{c:05d}.npy")
                os.replace(path, self._path(rel))
                files[name] = self._record(rel)
                self._written += files[name]["bytes"]
        finally:
            for path, _ in tmp.values():
                if os.path.exists(path):
                    os.unlink(path)
        self.manifest["splits"][split]["chunks"][str(c)] = {"start": start, "stop": stop, "files": files}
        self._verified.add((split, c))
        self._save()

    def _tap_dir(self, split: str, name: str) -> str:
        path = self._path(os.path.join(split, name))
        os.makedirs(path, exist_ok=True)
        return path

    # --- reading --------------------------------------------------------------------------------------------
    def dataset(
        self, split: str, taps: Sequence[str] | None = None, float_dtype: torch.dtype | None = None
    ) -> CachedTapDataset:
        """A dataset yielding ({tap: tensor}, label) for `split` (float taps widened to `float_dtype` if given);
        refuses a split with a bad or missing chunk."""
        bad = self.bad_chunks(split)
        if not self.labels_ok(split):
            bad = ["labels", *bad]
        if bad:
            raise CorruptCacheError(
                f"feature cache {self.root}: split {split!r} has {len(bad)} missing or corrupt chunk(s) "
                f"{bad[:5]}; run `thrifty extract` (or train with --cache) again to re-extract them"
            )
        return CachedTapDataset(self, split, self.taps if taps is None else taps, float_dtype=float_dtype)


def local_source(
    backbone: Backbone,
    taps: Sequence[str],
    *,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    amp: bool = False,
    extract: Callable[..., dict[str, torch.Tensor]] | None = None,
) -> BatchSource:
    """The local `backbone` as a batch source: `source(dataset, start, stop)` yields the tap dicts of those rows
    (`extract(backbone, inputs, taps)`, default `extract_taps`)."""
    from thrifty.runtime import autocast, to_device

    device = torch.device(device)
    backbone.to(device).eval()

    def source(dataset: LabelledDataset, start: int, stop: int) -> Iterator[dict[str, torch.Tensor]]:
        loader = DataLoader(dataset.subset(range(start, stop)), batch_size=batch_size, shuffle=False)
        for inputs, _ in loader:
            with autocast(device, amp):
                yield (extract or extract_taps)(backbone, to_device(inputs, device), taps)

    return source


def _to_numpy(t: torch.Tensor, name: str, dtype: str) -> np.ndarray:
    if name == MASK:
        return t.to(torch.uint8).cpu().numpy()
    return t.detach().float().cpu().numpy().astype(dtype, copy=False)


def _write_npy(path: str, arr: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, arr)

    atomic_write(path, write)
