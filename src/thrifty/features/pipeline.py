"""Extract once, train many: build or complete a feature cache, and turn a task into its cached counterpart."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from thrifty.backbones import Backbone
from thrifty.data.base import PROTOCOLS, LabelledDataset, TaskData
from thrifty.errors import DataError
from thrifty.features.budget import LOG, CacheEstimate, check_disk, estimate_split, probe_taps, stored_dtype
from thrifty.features.cache import MANIFEST, BatchSource, FeatureCache, local_source
from thrifty.features.taps import canonical_taps, extract_taps
from thrifty.runtime.denormals import flushed_denormals


def extract_features(
    root: str,
    backbone: Backbone,
    task: TaskData,
    taps: Sequence[str],
    *,
    splits: Sequence[str] | None = None,
    dtype: str | None = None,
    chunk_size: int = 256,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    amp: bool = False,
    checksum: str = "crc32",
    progress: bool = False,
    batches: BatchSource | None = None,
    flush_denormal: bool = True,
    disk_check: bool = True,
    tap_shapes: Callable[[LabelledDataset], dict[str, tuple[int, ...]]] | None = None,
) -> tuple[FeatureCache, list[dict[str, Any]]]:
    """Run the frozen `backbone` over `splits` of `task` (default: all) and store `taps` in `root`.

    Resumable and self-repairing: chunks already recorded and intact are kept, missing or corrupt ones are
    (re-)extracted. Returns the cache and one {'split', 'samples', 'chunks', 'extracted', 'bytes_written'} record
    per split. Before writing, a probe on a few samples gives the bytes and time the extraction will take
    (`cache.estimate`, logged on the `thrifty.features` logger); `disk_check`: refuse with DiskSpaceError when the
    disk cannot hold the bytes still to write (False: warn and go on).
    `batches`: where the taps come from (default: `backbone`; see `FeatureCache.extract_split`).
    `tap_shapes(dataset)`: the per-sample tap shapes `batches` yields, where the source knows them without running
    (a feature server: no probe request, no time estimate).
    `flush_denormal`: on CPU, run with subnormals flushed to zero (thrifty.runtime.denormals), as the training loop
    does by default, so cached taps equal what a run on the inputs computes.
    """
    names = list(task.splits) if splits is None else list(splits)
    unknown = [s for s in names if s not in task.splits]
    if unknown:
        raise DataError(f"{task.name} has no split(s) {unknown}; its splits are {sorted(task.splits)}")
    with flushed_denormals(flush_denormal, device):
        existing = FeatureCache.create_or_open(root, backbone, task, taps, dtype=dtype) if _is_cache(root) else None
        stored = existing.taps if existing is not None else canonical_taps(taps, len(backbone.blocks))
        kw = {"batch_size": batch_size, "device": device, "amp": amp}
        probe = batches or local_source(backbone, stored, **kw, extract=extract_taps)  # a separate source
        estimate = estimate_extraction(root, existing, task, names, stored, dtype, chunk_size, probe, tap_shapes)
        LOG.info("%s", estimate.describe())
        check_disk(estimate, disk_check)
        os.makedirs(root, exist_ok=True)
        cache = existing or FeatureCache.create_or_open(
            root, backbone, task, taps, dtype=dtype, chunk_size=chunk_size, checksum=checksum
        )
        cache.estimate = estimate
        stats = [
            cache.extract_split(
                backbone,
                s,
                task.splits[s],
                batch_size=batch_size,
                device=device,
                amp=amp,
                progress=progress,
                batches=batches,
            )
            for s in names
        ]
    return cache, stats


def _is_cache(root: str) -> bool:
    return os.path.isfile(os.path.join(root, MANIFEST))


def estimate_extraction(
    root: str,
    cache: FeatureCache | None,
    task: TaskData,
    splits: Sequence[str],
    taps: Sequence[str],
    dtype: str | None,
    chunk_size: int,
    source: BatchSource,
    tap_shapes: Callable[[LabelledDataset], dict[str, tuple[int, ...]]] | None = None,
) -> CacheEstimate:
    """Bytes (exact) and time (probe, unless `tap_shapes` gives the shapes) of extracting `splits` into `root`
    (`cache`: the cache already there)."""
    dtype = cache.dtype if cache is not None else (dtype or "float32")
    chunk_size = cache.chunk_size if cache is not None else chunk_size
    todo = {}
    for s in splits:
        entry = cache.manifest["splits"].get(s) if cache is not None else None
        missing = None if entry is None else cache.bad_chunks(s)
        if missing is None or missing:
            todo[s] = missing
    estimate = CacheEstimate(root, dtype, {})
    if not todo:
        return estimate
    first = task.splits[next(iter(todo))]
    shapes, per_sample = (tap_shapes(first), None) if tap_shapes is not None else probe_taps(source, first)
    if sorted(shapes) != sorted(taps):
        raise DataError(f"feature source gave taps {sorted(shapes)}, the cache stores {sorted(taps)}")
    estimate.taps = {t: (shapes[t], stored_dtype(t, dtype)) for t in taps}
    estimate.seconds_per_sample = per_sample
    for s in splits:
        missing = todo.get(s, [])
        estimate.splits[s] = estimate_split(len(task.splits[s]), chunk_size, estimate.taps, missing)
    return estimate


def roles_for(select_on_val: bool) -> list[str]:
    """The split roles a training run reads (see thrifty.data.base.PROTOCOLS)."""
    return ["tune_train", "val", "test"] if select_on_val else ["train", "test"]


def cached_task(
    root: str,
    backbone: Backbone,
    task: TaskData,
    taps: Sequence[str],
    *,
    roles: Sequence[str] = ("train", "test"),
    extract: bool = True,
    float_dtype: torch.dtype | None = None,
    **extract_kwargs: Any,
) -> TaskData:
    """`task` with the splits that play `roles` replaced by cached-tap datasets (extracting what is missing,
    unless `extract=False`: then the cache must be complete, e.g. when several data-parallel ranks read it).
    `float_dtype`: widen float taps to it as they are read (default: the cache's dtype)."""
    splits = sorted({PROTOCOLS[task.protocol][r] for r in roles})
    if extract:
        cache, stats = extract_features(root, backbone, task, taps, splits=splits, **extract_kwargs)
    else:
        cache = FeatureCache.open(root)
        cache.check(backbone, task, taps)
        stats = [{"split": s, "extracted": 0, "bytes_written": 0} for s in splits]
    meta = {
        **task.meta,
        "feature_cache": {
            "dir": os.path.abspath(root),
            "taps": cache.taps,
            "dtype": cache.dtype,
            "extracted_chunks": {s["split"]: s["extracted"] for s in stats},
            "bytes_written": sum(s["bytes_written"] for s in stats),
            "bytes": cache.bytes(),
            "estimated_bytes": cache.estimate.bytes if cache.estimate is not None else None,
        },
    }
    datasets = {s: cache.dataset(s, taps, float_dtype) for s in splits}
    return TaskData(task.name, datasets, task.num_classes, task.protocol, meta)
