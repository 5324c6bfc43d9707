"""Data: one `TaskData` for every source. `load_data(spec, preprocess)` resolves a spec string through the
dataset registry (`register_dataset`; `thrifty list datasets`):

- `vtab:PATH/TO/vtab-1k/<task>` (aliases accepted), always the 1k protocol;
- `fashion-mnist`, `digits`, `reviews`, `recommend` (packaged real data), `imagefolder:PATH`;
- a `:1k` suffix draws a seeded, stratified VTAB-1K-style task (train800/val200/train800val200/test).
"""

from __future__ import annotations

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
from thrifty.data.pools import from_pools
from thrifty.data.registry import DATASETS, available_datasets, parse_data_spec, register_dataset
from thrifty.data.vtab import VTAB_ALIASES, VTAB_TASKS, canonical_task, load_vtab, parse_split_file


def load_data(
    spec: str, preprocess: ImagePreprocess | TextPreprocess, *, seed: int = 0, test_size: int | None = None
) -> TaskData:
    """Resolve a data spec (see module docstring). `seed` seeds the 1k draw; `test_size` caps the test split."""
    source, path, modifiers = parse_data_spec(spec)
    return source.load(path, preprocess, few_sample="1k" in modifiers, seed=seed, test_size=test_size)


__all__ = [
    "DATASETS",
    "PROTOCOLS",
    "VTAB_ALIASES",
    "VTAB_TASKS",
    "ArrayImageDataset",
    "FileImageDataset",
    "LabelledDataset",
    "TaskData",
    "TextDataset",
    "available_datasets",
    "canonical_task",
    "few_sample_splits",
    "from_pools",
    "load_data",
    "load_vtab",
    "parse_split_file",
    "register_dataset",
    "stratified_sample",
]
