"""Data: one `TaskData` for every source. `load_data(spec, preprocess)` resolves a spec string through the
dataset registry (`register_dataset`; `thrifty list datasets`):

- `vtab:PATH/TO/vtab-1k/<task>` (aliases accepted), always the 1k protocol;
- `fashion-mnist`, `digits`, `reviews`, `recommend` (packaged real data), `imagefolder:PATH`;
- a `:1k` suffix draws a seeded, stratified VTAB-1K-style task (train800/val200/train800val200/test);
- a `:lt<IF>` suffix gives the training split(s) the long-tail profile (thrifty.data.longtail), test untouched;
  `:lt<IF>-max<N>-val<K>` adds a balanced `val` split of K per class drawn from the training samples the LT draw
  left unused (what `--select-on-val` selects on).

A task whose training split's class counts differ by more than `IMBALANCE_FACTOR` (10x), or any `:lt` task, names
the `long_tail` objective as its default (`TaskData.objective`; `--objective` overrides).
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
from thrifty.data.longtail import (
    IMBALANCE_FACTOR,
    LongTailSpec,
    apply_long_tail,
    balanced_subsets,
    long_tail_indices,
    profile_counts,
    shot_groups,
    with_default_objective,
)
from thrifty.data.pools import from_pools
from thrifty.data.registry import DATASETS, available_datasets, parse_data_spec, register_dataset
from thrifty.data.vtab import VTAB_ALIASES, VTAB_TASKS, canonical_task, load_vtab, parse_split_file


def load_data(
    spec: str, preprocess: ImagePreprocess | TextPreprocess, *, seed: int = 0, test_size: int | None = None
) -> TaskData:
    """Resolve a data spec (see module docstring). `seed` seeds the 1k and long-tail draws; `test_size` caps the
    test split."""
    source, path, modifiers = parse_data_spec(spec)
    lt = [LongTailSpec.parse(m) for m in modifiers if m.startswith("lt")]  # before loading: fail fast on IF < 1
    task = source.load(path, preprocess, few_sample="1k" in modifiers, seed=seed, test_size=test_size)
    if lt:
        task = apply_long_tail(task, lt[0], seed)
    return with_default_objective(task)


__all__ = [
    "DATASETS",
    "IMBALANCE_FACTOR",
    "PROTOCOLS",
    "VTAB_ALIASES",
    "VTAB_TASKS",
    "ArrayImageDataset",
    "FileImageDataset",
    "LabelledDataset",
    "LongTailSpec",
    "TaskData",
    "TextDataset",
    "apply_long_tail",
    "available_datasets",
    "balanced_subsets",
    "canonical_task",
    "few_sample_splits",
    "from_pools",
    "load_data",
    "load_vtab",
    "long_tail_indices",
    "parse_split_file",
    "profile_counts",
    "register_dataset",
    "shot_groups",
    "stratified_sample",
    "with_default_objective",
]
