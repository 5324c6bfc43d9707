"""A TaskData from a source's raw pools: the whole train/test split ('full') or a seeded 1k draw."""

from __future__ import annotations

import numpy as np

from thrifty.backbones.preprocess import ImagePreprocess, TextPreprocess
from thrifty.data.base import ArrayImageDataset, FileImageDataset, LabelledDataset, TaskData, TextDataset
from thrifty.data.few_sample import few_sample_splits, stratified_sample
from thrifty.data.packaged import Pools
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
        return TaskData(f"{name}:1k", splits, pools.num_classes, "1k", meta, objective=pools.objective)
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
    return TaskData(name, splits, pools.num_classes, "full", meta, objective=pools.objective)
