"""Turn any labelled source into a VTAB-1K-style few-sample task: train800, val200, train800val200, test.

Seeded and stratified: each class gets its share of every split by largest-remainder rounding of its frequency
(`balanced=True`: equal shares). train800 and val200 are disjoint draws from the source's training pool; test is
drawn from the test pool (all of it unless `n_test`).
"""

from __future__ import annotations

import numpy as np

from thrifty.errors import DataError


def _quota(counts: np.ndarray, n: int, balanced: bool) -> np.ndarray:
    """Per-class sample counts summing to n, proportional to `counts` (or equal), never above `counts`."""
    k = len(counts)
    if n > counts.sum():
        raise DataError(f"asked for {n} samples but the pool holds only {int(counts.sum())}")
    weights = np.ones(k) if balanced else counts.astype(np.float64)
    weights = np.where(counts > 0, weights, 0.0)
    quota = np.zeros(k, dtype=np.int64)
    left = n
    while left > 0:  # water-filling: classes that run out hand their share to the others
        open_ = quota < counts
        share = weights * open_
        raw = share / share.sum() * left
        add = np.minimum(np.floor(raw).astype(np.int64), counts - quota)
        rem = raw - np.floor(raw)
        if add.sum() == 0:  # distribute the remainder by largest fractional part, one each, to open classes
            need = left
            for c in np.argsort(-rem, kind="stable"):
                if need and open_[c]:
                    add[c] += 1
                    need -= 1
        quota += add
        left = n - int(quota.sum())
    return quota


def stratified_sample(
    labels: np.ndarray, n: int, rng: np.random.Generator, balanced: bool = False, num_classes: int | None = None
) -> np.ndarray:
    """Indices of `n` samples drawn per class (see module docstring), in random order."""
    labels = np.asarray(labels)
    k = int(num_classes or labels.max() + 1)
    counts = np.bincount(labels, minlength=k)
    quota = _quota(counts, n, balanced)
    picks = [rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in enumerate(quota)]
    return rng.permutation(np.concatenate(picks)) if picks else np.zeros(0, np.int64)


def few_sample_splits(
    train_labels: np.ndarray,
    test_labels: np.ndarray | None = None,
    *,
    n_train: int = 800,
    n_val: int = 200,
    n_test: int | None = None,
    seed: int = 0,
    balanced: bool = False,
) -> dict[str, np.ndarray]:
    """Index arrays for the 1k protocol. `test` indexes `test_labels` (or the rest of the training pool, if None)."""
    train_labels = np.asarray(train_labels)
    rng = np.random.default_rng(seed)
    k = int(max(train_labels.max(), -1 if test_labels is None else np.max(test_labels)) + 1)
    pick = stratified_sample(train_labels, n_train + n_val, rng, balanced, k)
    # split the pick into train / val, stratified again so both keep the class shares
    val_local = stratified_sample(train_labels[pick], n_val, rng, balanced, k)
    is_val = np.zeros(len(pick), bool)
    is_val[val_local] = True
    train800, val200 = pick[~is_val], pick[is_val]
    if test_labels is None:
        rest = np.setdiff1d(np.arange(len(train_labels)), pick)
        n = len(rest) if n_test is None else n_test
        test = rest[stratified_sample(train_labels[rest], n, rng, balanced, k)]
    else:
        test_labels = np.asarray(test_labels)
        n = len(test_labels) if n_test is None else n_test
        test = stratified_sample(test_labels, n, rng, balanced, k)
    return {
        "train800": np.sort(train800),
        "val200": np.sort(val200),
        "train800val200": np.sort(pick),
        "test": np.sort(test),
    }
