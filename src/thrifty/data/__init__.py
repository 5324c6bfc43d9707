"""Data: one `TaskData` for every source. `load_data(spec, preprocess)` resolves a spec string:

- `vtab:PATH/TO/vtab-1k/<task>` (aliases accepted), always the 1k protocol;
- `fashion-mnist`, `digits`, `reviews`, `recommend` (packaged real data), `imagefolder:PATH`;
- a `:1k` suffix draws a seeded, stratified VTAB-1K-style task (train800/val200/train800val200/test).
"""

from __future__ import annotations

import numpy as np

from thrifty.backbones.preprocess import ImagePreprocess, TextPreprocess
from thrifty.data.base import (
    PROTOCOLS,
    ArrayImageDataset,
    FileImageDataset,
    LabelledDataset,
    TaskData,
    TextDataset,
)
from thrifty.data.few_sample import few_sample_splits, stratified_sample
from thrifty.data.packaged import PACKAGED, Pools, image_folder
from thrifty.data.vtab import VTAB_ALIASES, VTAB_TASKS, canonical_task, load_vtab, parse_split_file
from thrifty.errors import DataError


def _dataset(pools: Pools, samples, labels, preprocess, source: str) -> LabelledDataset:
    if pools.kind == "text":
        if not isinstance(preprocess, TextPreprocess):
            raise DataError(f"{source} is a text task; pick a text backbone (e.g. minilm)")
        return TextDataset(samples, labels, preprocess, source)
    if not isinstance(preprocess, ImagePreprocess):
        raise DataError(f"{source} is an image task; pick an image backbone (timm:..., efficientnet-lite0)")
    if pools.kind == "image_array":
        return ArrayImageDataset(samples, labels, preprocess, source)
    return FileImageDataset(samples, labels, preprocess)


def _take(samples, idx: np.ndarray):
    return samples[idx] if isinstance(samples, np.ndarray) else [samples[i] for i in idx]


def from_pools(
    name: str, pools: Pools, preprocess, *, few_sample: bool, seed: int = 0, test_size: int | None = None
) -> TaskData:
    """Build a TaskData from raw pools, whole ('full') or as a 1k task."""
    (xtr, ytr), test = pools.train, pools.test
    meta = {"source": pools.description, "class_names": pools.class_names}
    if few_sample:
        idx = few_sample_splits(
            ytr, None if test is None else test[1], n_test=test_size, seed=seed, balanced=pools.balanced_1k
        )
        test_src = (xtr, ytr) if test is None else test
        splits = {}
        for split, ix in idx.items():
            xs, ys = test_src if split == "test" else (xtr, ytr)
            splits[split] = _dataset(pools, _take(xs, ix), ys[ix], preprocess, f"{name}/{split}")
        meta.update(split_seed=seed, balanced_splits=pools.balanced_1k)
        return TaskData(f"{name}:1k", splits, pools.num_classes, "1k", meta)
    if test is None:
        raise DataError(f"{name} has no test split; use the :1k protocol or add a test/ folder")
    xte, yte = test
    if test_size is not None and test_size < len(yte):
        ix = np.sort(stratified_sample(yte, test_size, np.random.default_rng(seed)))
        xte, yte = _take(xte, ix), yte[ix]
    splits = {
        "train": _dataset(pools, xtr, ytr, preprocess, f"{name}/train"),
        "test": _dataset(pools, xte, yte, preprocess, f"{name}/test"),
    }
    return TaskData(name, splits, pools.num_classes, "full", meta)


def load_data(
    spec: str, preprocess: ImagePreprocess | TextPreprocess, *, seed: int = 0, test_size: int | None = None
) -> TaskData:
    """Resolve a data spec (see module docstring). `seed` seeds the 1k draw; `test_size` caps the test split."""
    few = spec.endswith(":1k")
    body = spec[: -len(":1k")] if few else spec
    if body.startswith("vtab:"):
        task = load_vtab(body[5:], preprocess)
        if test_size is not None and test_size < len(task.splits["test"]):
            t = task.splits["test"]
            task.splits["test"] = t.subset(
                np.sort(
                    stratified_sample(t.labels, test_size, np.random.default_rng(seed), num_classes=task.num_classes)
                )
            )
        return task
    if body.startswith("imagefolder:"):
        return from_pools(
            body, image_folder(body[len("imagefolder:") :]), preprocess, few_sample=few, seed=seed, test_size=test_size
        )
    if body in PACKAGED:
        return from_pools(body, PACKAGED[body](), preprocess, few_sample=few, seed=seed, test_size=test_size)
    raise DataError(
        f"unknown data spec {spec!r}; use vtab:PATH, imagefolder:PATH or one of {sorted(PACKAGED)} "
        "(append :1k for the few-sample protocol)"
    )


__all__ = [
    "PROTOCOLS",
    "VTAB_ALIASES",
    "VTAB_TASKS",
    "ArrayImageDataset",
    "FileImageDataset",
    "LabelledDataset",
    "TaskData",
    "TextDataset",
    "canonical_task",
    "few_sample_splits",
    "from_pools",
    "load_data",
    "load_vtab",
    "parse_split_file",
    "stratified_sample",
]
