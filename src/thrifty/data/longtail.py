"""Long-tailed training splits from any labelled source (`:lt<IF>`), shot groups and BTM's balanced subsets.

Profile (the CIFAR-LT construction of LDAM-DRW `imbalance_cifar.py`, also BTM's `datasets/cifar100.py`; spec
longtail-ssl.md §6), for the class at rank r = 0..C-1 of the class order:

    n_r = int(n_max * IF ** (-r / (C - 1)))        # truncated, as `int(img_max * imb_factor ** (i / (C - 1)))`

then each class keeps the first n_r of a seeded shuffle of its samples. n_max is the largest class size for which
every class still has n_r samples (for a balanced source: the class size, as in CIFAR-LT), capped by `max`.
Class order: `index` (class 0 is the head; CIFAR-LT's), `perm` (a seeded permutation), `count` (descending source
count, for already-skewed sources). Modifier syntax: `:lt<IF>[-index|-perm|-count][-max<N>][-val<N>]`, e.g.
`fashion-mnist:lt100`, `reviews:lt100-count-max1000`, `digits:lt10-perm-max50`, `fashion-mnist:lt100-max1000-val100`.

Validation split (`-val<N>`, protocol "full" only): a balanced `val` split of N samples per class, the first N of a
seeded shuffle (its own random stream) of the source's training samples of that class that the long-tailed draw did
NOT keep; disjoint from the LT `train` split, which is identical to the draw without `-val`. It is what
`--select-on-val` and the greedy soup select on, so nothing is picked on `test`. A class with fewer than N leftovers
is a DataError: without `-max` a balanced source keeps its whole head class, so pair `-val` with `-max<N>` below
the class size (Fashion-MNIST-LT `-max1000` leaves >= 5,000 unused images per class).

Composition with `:1k` (either order in the spec): the source, and its 1k draw if any, load first; then every split
that trains gets the profile on its own (protocol "full": `train`; "1k": `train800val200` and `train800`, each with
its own n_max), with one class order; `val`/`val200` and `test` are never touched (balanced evaluation).

Shot groups (by the LT training count n_c): many n_c > 100, few n_c < 20, medium otherwise (BALMS `shot_acc`;
the issue's "> 100, 20-100, < 20"); thresholds configurable; recorded in `TaskData.meta["long_tail"]`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from thrifty.errors import DataError


LT_MODIFIER = re.compile(r"lt(\d+(?:\.\d*)?)((?:-(?:index|perm|count|max\d+|val\d+))*)")
ORDERS = ("index", "perm", "count")
MANY_THRESHOLD, FEW_THRESHOLD = 100, 20
IMBALANCE_FACTOR = 10.0  # max/min training class count above which a task selects the `long_tail` objective


@dataclass(frozen=True)
class LongTailSpec:
    """`imbalance` = IF = n_max / n_min >= 1; `order` of the classes along the profile; `max_per_class` caps n_max;
    `val_per_class` draws a balanced `val` split of that many unused training samples per class (module docstring)."""

    imbalance: float
    order: str = "index"
    max_per_class: int | None = None
    many_threshold: int = MANY_THRESHOLD
    few_threshold: int = FEW_THRESHOLD
    val_per_class: int | None = None

    def __post_init__(self) -> None:
        if not np.isfinite(self.imbalance) or self.imbalance < 1:
            raise DataError(
                f"imbalance factor must be >= 1 (n_max / n_min), got {self.imbalance}; e.g. :lt100 or :lt10"
            )
        if self.order not in ORDERS:
            raise DataError(f"long-tail class order must be one of {ORDERS}, got {self.order!r}")
        if self.max_per_class is not None and self.max_per_class < 1:
            raise DataError(f"-max<N> must be >= 1, got {self.max_per_class}")
        if self.val_per_class is not None and self.val_per_class < 1:
            raise DataError(f"-val<N> must be >= 1 samples per class, got {self.val_per_class}")
        if self.few_threshold > self.many_threshold:
            raise DataError(f"few threshold {self.few_threshold} is above the many threshold {self.many_threshold}")

    @classmethod
    def parse(cls, token: str) -> LongTailSpec:
        """'lt100' -> LongTailSpec(100.0); 'lt20-count-max500' -> (20.0, 'count', 500); '-val100' sets
        val_per_class = 100."""
        m = LT_MODIFIER.fullmatch(token)
        if not m:
            raise DataError(f"bad long-tail modifier {token!r}; use lt<IF>[-index|-perm|-count][-max<N>][-val<N>]")
        order, cap, val = "index", None, None
        for opt in filter(None, m.group(2).split("-")):
            if opt.startswith("max"):
                cap = int(opt[3:])
            elif opt.startswith("val"):
                val = int(opt[3:])
            else:
                order = opt
        return cls(float(m.group(1)), order, cap, val_per_class=val)


def profile_counts(n_max: int, num_classes: int, imbalance: float) -> np.ndarray:
    """n_r = int(n_max * IF^(-r/(C-1))) for ranks r = 0..C-1 (CIFAR-LT's truncation)."""
    if num_classes == 1:
        return np.array([int(n_max)], np.int64)
    r = np.arange(num_classes)
    return np.array([int(n_max * (1.0 / imbalance) ** (i / (num_classes - 1))) for i in r], np.int64)


def class_order(available: np.ndarray, order: str, seed: int) -> np.ndarray:
    """Classes from head to tail: by index, a seeded permutation, or descending available count (stable)."""
    c = len(available)
    if order == "perm":
        return np.random.default_rng([seed, 7919]).permutation(c)
    if order == "count":
        return np.argsort(-available, kind="stable")
    return np.arange(c)


def long_tail_counts(available: np.ndarray, spec: LongTailSpec, seed: int = 0) -> np.ndarray:
    """Per-class LT counts (indexed by class) that fit in `available` (per-class source counts)."""
    available = np.asarray(available, np.int64)
    c = len(available)
    ranks = np.empty(c, np.int64)
    ranks[class_order(available, spec.order, seed)] = np.arange(c)
    fraction = (1.0 / spec.imbalance) ** (ranks / max(1, c - 1))  # n_c / n_max before truncation
    n_max = int(np.floor(np.min(available / fraction) + 1e-9))  # largest n_max with int(n_max*f_c) <= available_c
    if spec.max_per_class is not None:
        n_max = min(n_max, spec.max_per_class)
    per_rank = profile_counts(n_max, c, spec.imbalance)
    counts = per_rank[ranks]
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        raise DataError(
            f"the long-tail profile IF={spec.imbalance:g} leaves class {int(empty[0])} with 0 samples "
            f"(n_max = {n_max}, source counts {available.tolist()}); lower the imbalance factor, raise -max, or use "
            "a source with more samples per class"
        )
    return counts


def long_tail_indices(labels: np.ndarray, num_classes: int, spec: LongTailSpec, seed: int = 0) -> np.ndarray:
    """Sorted indices of the LT subset: per class, the first n_c of a seeded shuffle of its samples."""
    labels = np.asarray(labels, np.int64)
    available = np.bincount(labels, minlength=num_classes)
    if (available == 0).any():
        raise DataError(
            f"class {int(np.flatnonzero(available == 0)[0])} has no training samples; a long-tail profile needs "
            "every class present in the training split"
        )
    counts = long_tail_counts(available, spec, seed)
    rng = np.random.default_rng([seed, 104729])
    keep = [rng.permutation(np.flatnonzero(labels == c))[:n] for c, n in enumerate(counts)]
    return np.sort(np.concatenate(keep))


def leftover_val_indices(
    labels: np.ndarray, kept: np.ndarray, num_classes: int, per_class: int, seed: int = 0
) -> np.ndarray:
    """Sorted indices of a balanced val split: per class, the first `per_class` of a seeded shuffle of the samples
    NOT in `kept` (the LT draw). Disjoint from `kept` by construction; DataError naming every short class."""
    labels = np.asarray(labels, np.int64)
    left = np.ones(len(labels), bool)
    left[np.asarray(kept, np.int64)] = False
    pools = [np.flatnonzero(left & (labels == c)) for c in range(num_classes)]
    short = {c: len(p) for c, p in enumerate(pools) if len(p) < per_class}
    if short:
        raise DataError(
            f"-val{per_class} needs {per_class} unused training samples per class, but the long-tail draw left "
            f"{', '.join(f'class {c}: {n}' for c, n in short.items())}; lower -val<N>, or cap the head with -max<N> "
            "below the class size so the LT draw leaves samples unused"
        )
    rng = np.random.default_rng([seed, 6151])  # a stream of its own: the LT draw is the same with or without -val
    return np.sort(np.concatenate([rng.permutation(p)[:per_class] for p in pools]))


def shot_groups(counts: np.ndarray, many: int = MANY_THRESHOLD, few: int = FEW_THRESHOLD) -> dict[str, list[int]]:
    """Classes by training count: many n > `many`, few n < `few`, medium otherwise."""
    counts = np.asarray(counts)
    return {
        "many": np.flatnonzero(counts > many).tolist(),
        "medium": np.flatnonzero((counts <= many) & (counts >= few)).tolist(),
        "few": np.flatnonzero(counts < few).tolist(),
    }


def imbalance_ratio(labels: np.ndarray, num_classes: int) -> float:
    """max / min class count of `labels` (inf when a class is missing)."""
    counts = np.bincount(np.asarray(labels, np.int64), minlength=num_classes)
    return float("inf") if counts.min() == 0 else float(counts.max() / counts.min())


def long_tail_meta(counts: np.ndarray, spec: LongTailSpec | None, split: str) -> dict[str, Any]:
    many, few = (spec.many_threshold, spec.few_threshold) if spec else (MANY_THRESHOLD, FEW_THRESHOLD)
    return {
        "split": split,
        "class_counts": np.asarray(counts).tolist(),
        "imbalance": float(np.max(counts) / max(1, np.min(counts))),
        "many_threshold": many,
        "few_threshold": few,
        "groups": shot_groups(counts, many, few),
        **({"spec": dataclasses.asdict(spec)} if spec else {}),
    }


def apply_long_tail(task, spec: LongTailSpec, seed: int = 0):
    """A copy of `task` whose training splits follow the LT profile (module docstring); objective `long_tail`."""
    from thrifty.data.base import PROTOCOLS, TaskData

    roles = PROTOCOLS[task.protocol]
    if spec.val_per_class is not None and (task.protocol != "full" or roles["val"] in task.splits):
        raise DataError(
            f"{task.name}: -val{spec.val_per_class} draws a val split for a task that has none (protocol 'full'); "
            f"this one has {roles['val']!r} already (protocol {task.protocol!r}): drop -val<N>"
        )
    trained = list(dict.fromkeys(roles[r] for r in ("train", "tune_train") if roles[r] in task.splits))
    untouched = {roles[r] for r in ("test", "val")} & set(task.splits)
    splits = dict(task.splits)
    extra: dict[str, Any] = {}
    for name in trained:
        if name in untouched:
            continue
        ds = splits[name]
        kept = long_tail_indices(ds.labels, task.num_classes, spec, seed)
        splits[name] = ds.subset(kept)
        if spec.val_per_class is not None and name == roles["train"]:
            val = leftover_val_indices(ds.labels, kept, task.num_classes, spec.val_per_class, seed)
            splits[roles["val"]] = ds.subset(val)
            extra = {"val_per_class": spec.val_per_class, "val_source": "training samples the LT draw did not keep"}
    final = splits[roles["train"]]
    counts = np.bincount(final.labels, minlength=task.num_classes)
    meta = {**task.meta, "long_tail": {**long_tail_meta(counts, spec, roles["train"]), "seed": seed, **extra}}
    return TaskData(f"{task.name}:lt{spec.imbalance:g}", splits, task.num_classes, task.protocol, meta, "long_tail")


def with_default_objective(task):
    """`task` with objective `long_tail` when it has none and its training split's max/min class count exceeds
    IMBALANCE_FACTOR (10); the counts and groups are recorded in `meta["long_tail"]`. Tasks of the 1k protocol
    (VTAB-1K) keep top-1 classification, the protocol's metric, unless `:lt` or `--objective` asks otherwise."""
    if task.objective is not None or task.protocol == "1k" or not task.has("train"):
        return task
    train = task.split("train")
    if imbalance_ratio(train.labels, task.num_classes) <= IMBALANCE_FACTOR:
        return task
    counts = np.bincount(train.labels, minlength=task.num_classes)
    task.meta = {**task.meta, "long_tail": long_tail_meta(counts, None, "train")}
    task.objective = "long_tail"
    return task


def balanced_subsets(
    labels: np.ndarray, num_classes: int, per_class: int, count: int, seed: int = 0
) -> list[np.ndarray]:
    """BTM's undersampled subsets (count_sampler.py): subset m takes, per class c, the first min(n_c, K) samples of
    an independent seeded shuffle of class c (without replacement). Returns `count` sorted index arrays."""
    if per_class < 1 or count < 1:
        raise DataError(f"balanced subsets need per_class >= 1 and count >= 1, got {per_class}, {count}")
    labels = np.asarray(labels, np.int64)
    by_class = [np.flatnonzero(labels == c) for c in range(num_classes)]
    out = []
    for m in range(count):
        rng = np.random.default_rng([seed, m, 15485863])
        out.append(np.sort(np.concatenate([rng.permutation(ix)[:per_class] for ix in by_class])))
    return out
