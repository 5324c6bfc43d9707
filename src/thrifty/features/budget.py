"""Size and time of a feature extraction before it runs, and the free-disk check that refuses one that cannot fit.

    bytes = sum over splits and chunks of the .npy files: header + rows x (per-sample elements x item size) per tap
            (float taps in the cache dtype, `mask` as uint8), plus each split's labels.npy (int64)

The per-sample shapes come from a probe: the feature source (the local backbone) runs twice on a few samples of
the first split to extract (the first call warms up), which gives a rough time per sample (a small batch runs slower
per sample than the extraction's batches, so the estimate errs long); a feature server states its shapes in /info
(no probe request, no time). Headers are computed as numpy writes them, so the estimate is the exact size of the
files the cache will hold (manifest.json, a few KB, aside). Chunks already in the cache are not counted.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from thrifty.data.base import LabelledDataset
from thrifty.errors import DiskSpaceError
from thrifty.features.taps import MASK


LOG = logging.getLogger("thrifty.features")
DISK_FLAG = "--skip-disk-check"
PROBE_SAMPLES = 8


@dataclass
class CacheEstimate:
    """What an extraction will write: `bytes` (files still to write), `total_bytes` (the whole cache once
    complete), per split {samples, chunks, bytes}, and the probe's seconds per sample (None without a probe)."""

    root: str
    dtype: str
    taps: dict[str, tuple[tuple[int, ...], str]]  # tap -> (per-sample shape, stored numpy dtype)
    splits: dict[str, dict[str, int]] = field(default_factory=dict)
    seconds_per_sample: float | None = None

    @property
    def bytes(self) -> int:
        return sum(s["bytes"] for s in self.splits.values())

    @property
    def total_bytes(self) -> int:
        return sum(s["total_bytes"] for s in self.splits.values())

    @property
    def samples(self) -> int:
        return sum(s["samples"] for s in self.splits.values())

    @property
    def seconds(self) -> float | None:
        return None if self.seconds_per_sample is None else self.seconds_per_sample * self.samples

    def to_dict(self) -> dict[str, Any]:
        return {
            "bytes": self.bytes,
            "total_bytes": self.total_bytes,
            "samples": self.samples,
            "seconds": None if self.seconds is None else round(self.seconds, 1),
            "dtype": self.dtype,
            "per_sample_bytes": per_sample_bytes(self.taps),
            "splits": self.splits,
        }

    def describe(self) -> str:
        """One line for people: bytes to write (and of the whole cache), per sample, time."""
        what = f"{human_bytes(self.bytes)} to write" if self.bytes != self.total_bytes else human_bytes(self.bytes)
        total = f" (cache {human_bytes(self.total_bytes)})" if self.bytes != self.total_bytes else ""
        per = human_bytes(per_sample_bytes(self.taps))
        splits = ", ".join(f"{k} {v['samples']}" for k, v in self.splits.items() if v["samples"])
        line = f"feature cache {self.root}: {what}{total}, {per}/sample x {self.samples} samples"
        line += f" ({splits}), {self.dtype}" if splits else f", {self.dtype}"
        if self.seconds is not None and self.samples:
            line += f"; about {human_seconds(self.seconds)} (probe)"
        return line


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def human_seconds(s: float) -> str:
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.0f} min" if s < 5400 else f"{s / 3600:.1f} h"


def npy_header_bytes(shape: tuple[int, ...], dtype: str | np.dtype) -> int:
    """Bytes of the header numpy writes before an array of `shape` and `dtype` (format 1.0)."""
    buf = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)}
    np.lib.format.write_array_header_1_0(buf, header)
    return len(buf.getvalue())


def npy_bytes(shape: tuple[int, ...], dtype: str | np.dtype) -> int:
    return npy_header_bytes(shape, dtype) + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def per_sample_bytes(taps: dict[str, tuple[tuple[int, ...], str]]) -> int:
    return sum(int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize for shape, dt in taps.values())


def stored_dtype(tap: str, cache_dtype: str) -> str:
    return "uint8" if tap == MASK else cache_dtype


def probe_taps(
    source: Callable[[LabelledDataset, int, int], Iterable[dict[str, torch.Tensor]]],
    dataset: LabelledDataset,
    samples: int = PROBE_SAMPLES,
) -> tuple[dict[str, tuple[int, ...]], float]:
    """Per-sample tap shapes, and seconds per sample from `source(dataset, 0, k)` on k <= `samples` rows, timed on
    the second of two calls (the first warms up; a small batch still runs slower per sample than the extraction's
    batches, so the time errs long)."""
    shapes: dict[str, tuple[int, ...]] = {}
    k = max(1, min(samples, len(dataset)))
    with torch.random.fork_rng(devices=[]):  # a DataLoader draws from the global generator: leave it as it was
        for taps in source(dataset, 0, k):
            shapes = {name: tuple(t.shape[1:]) for name, t in taps.items()}
        t0 = time.perf_counter()
        for _ in source(dataset, 0, k):
            pass
    return shapes, (time.perf_counter() - t0) / k


def estimate_split(
    size: int, chunk_size: int, taps: dict[str, tuple[tuple[int, ...], str]], missing: Sequence[int] | None = None
) -> dict[str, int]:
    """{samples, chunks, bytes, total_bytes} of one split; `missing`: the chunks still to extract (None: all,
    and labels.npy too)."""
    chunks = -(-size // chunk_size)
    todo = list(range(chunks)) if missing is None else list(missing)

    def chunk_bytes(c: int) -> int:
        rows = min(size, (c + 1) * chunk_size) - c * chunk_size
        return sum(npy_bytes((rows, *shape), dt) for shape, dt in taps.values())

    labels = npy_bytes((size,), "int64")
    total = labels + sum(chunk_bytes(c) for c in range(chunks))
    to_write = (labels if missing is None else 0) + sum(chunk_bytes(c) for c in todo)
    samples = sum(min(size, (c + 1) * chunk_size) - c * chunk_size for c in todo)
    return {"samples": samples, "chunks": len(todo), "bytes": to_write, "total_bytes": total}


def free_bytes(root: str) -> int:
    """Free bytes on the filesystem that holds `root` (or its nearest existing parent)."""
    path = os.path.abspath(root)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


def check_disk(estimate: CacheEstimate, check: bool = True) -> int:
    """Raise DiskSpaceError when the free space of `estimate.root`'s disk is below the bytes to write (unless
    `check` is False: then only a warning); returns the free bytes."""
    free = free_bytes(estimate.root)
    if estimate.bytes <= free:
        return free
    fixes = "fewer taps (--taps / --set taps=...), fewer splits (--splits)"
    if estimate.dtype != "float16":
        fixes = f"float16 storage (--fp16, about half), {fixes}"
    msg = (
        f"feature cache {estimate.root} needs {human_bytes(estimate.bytes)} but its disk has {human_bytes(free)} "
        f"free; free some space, write the cache elsewhere, or make it smaller: {fixes}. {DISK_FLAG} extracts anyway"
    )
    if check:
        raise DiskSpaceError(msg)
    LOG.warning("%s (continuing: %s)", msg.split("; ")[0], DISK_FLAG)
    return free
