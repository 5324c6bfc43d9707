"""Extract once, train many: build or complete a feature cache, and turn a task into its cached counterpart."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from thrifty.backbones import Backbone
from thrifty.data.base import PROTOCOLS, TaskData
from thrifty.errors import DataError
from thrifty.features.cache import BatchSource, FeatureCache
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
) -> tuple[FeatureCache, list[dict[str, Any]]]:
    """Run the frozen `backbone` over `splits` of `task` (default: all) and store `taps` in `root`.

    Resumable and self-repairing: chunks already recorded and intact are kept, missing or corrupt ones are
    (re-)extracted. Returns the cache and one {'split', 'samples', 'chunks', 'extracted'} record per split.
    `batches`: where the taps come from (default: `backbone`; see `FeatureCache.extract_split`).
    `flush_denormal`: on CPU, run with subnormals flushed to zero (thrifty.runtime.denormals), as the training loop
    does by default, so cached taps equal what a run on the inputs computes.
    """
    names = list(task.splits) if splits is None else list(splits)
    unknown = [s for s in names if s not in task.splits]
    if unknown:
        raise DataError(f"{task.name} has no split(s) {unknown}; its splits are {sorted(task.splits)}")
    os.makedirs(root, exist_ok=True)
    cache = FeatureCache.create_or_open(
        root, backbone, task, taps, dtype=dtype, chunk_size=chunk_size, checksum=checksum
    )
    with flushed_denormals(flush_denormal, device):
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
        stats = [{"split": s, "extracted": 0} for s in splits]
    meta = {
        **task.meta,
        "feature_cache": {
            "dir": os.path.abspath(root),
            "taps": cache.taps,
            "dtype": cache.dtype,
            "extracted_chunks": {s["split"]: s["extracted"] for s in stats},
        },
    }
    datasets = {s: cache.dataset(s, taps, float_dtype) for s in splits}
    return TaskData(task.name, datasets, task.num_classes, task.protocol, meta)
