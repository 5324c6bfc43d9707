"""Long-tailed data: the exact CIFAR-LT profile, the untouched test split, `:1k` composition, seeding, shot groups,
the default objective, the CIFAR pickle loader and the class-balanced sampler."""

import os
import pickle

import numpy as np
import pytest

from thrifty.backbones.preprocess import ImagePreprocess
from thrifty.data import (
    ArrayImageDataset,
    LongTailSpec,
    TaskData,
    load_data,
    long_tail_indices,
    profile_counts,
    shot_groups,
    with_default_objective,
)
from thrifty.data.balanced_sampler import ClassBalancedSampler
from thrifty.data.longtail import leftover_val_indices, long_tail_counts
from thrifty.errors import DataError


PRE = ImagePreprocess(size=(8, 8), mean=(0.5,) * 3, std=(0.5,) * 3)


def test_profile_is_the_cifar_lt_formula():
    # LDAM-DRW: img_max * imb_factor ** (i / (C - 1)), truncated; the sizes of longtail-ssl.md §6
    for c, n_max, factor, total in ((10, 5000, 100, 12406), (100, 500, 100, 10847), (10, 5000, 10, 20431)):
        counts = profile_counts(n_max, c, factor)
        assert counts.tolist() == [int(n_max * (1 / factor) ** (i / (c - 1))) for i in range(c)]
        assert counts.sum() == total
    assert profile_counts(5000, 10, 100)[-1] == 50 and profile_counts(500, 100, 100)[-1] == 5


def test_lt_indices_have_the_exact_counts_and_are_seeded():
    labels = np.repeat(np.arange(10), 50)
    np.random.default_rng(0).shuffle(labels)
    idx = long_tail_indices(labels, 10, LongTailSpec(10), seed=3)
    assert np.bincount(labels[idx], minlength=10).tolist() == [int(50 * 0.1 ** (i / 9)) for i in range(10)]
    assert len(np.unique(idx)) == len(idx)
    assert np.array_equal(idx, long_tail_indices(labels, 10, LongTailSpec(10), seed=3))
    assert not np.array_equal(idx, long_tail_indices(labels, 10, LongTailSpec(10), seed=4))
    # a seeded permutation of the classes along the profile: same multiset of counts, another order
    perm = np.bincount(labels[long_tail_indices(labels, 10, LongTailSpec(10, "perm"), seed=3)], minlength=10)
    assert sorted(perm.tolist()) == sorted(np.bincount(labels[idx], minlength=10).tolist())
    assert perm.tolist() != np.bincount(labels[idx], minlength=10).tolist()
    # `-max` caps n_max; `count` orders an already-skewed source by its own counts
    capped = long_tail_indices(labels, 10, LongTailSpec(10, max_per_class=20))
    assert np.bincount(labels[capped], minlength=10).tolist() == profile_counts(20, 10, 10).tolist()
    skew = long_tail_counts(np.array([10, 40, 20]), LongTailSpec(4, "count"))
    assert skew.tolist() == [10, 40, 20]  # head = the largest class: n_max = 40
    assert long_tail_counts(np.array([10, 40, 20]), LongTailSpec(4)).tolist() == [10, 5, 2]  # by index: n_max = 10


def test_lt_spec_parsing_and_typed_errors():
    assert LongTailSpec.parse("lt20-count-max500") == LongTailSpec(20.0, "count", 500)
    with pytest.raises(DataError, match=">= 1"):
        LongTailSpec.parse("lt0.5")
    with pytest.raises(DataError, match=">= 1"):
        load_data("digits:lt0.5", PRE)
    with pytest.raises(DataError, match="0 samples"):
        load_data("digits:lt1000", PRE)  # ~120 per class: int(n_max / 1000) = 0 for the tail class
    with pytest.raises(DataError, match="no training samples"):
        long_tail_indices(np.array([0, 0, 2, 2]), 3, LongTailSpec(2))
    with pytest.raises(DataError, match="once"):
        load_data("digits:lt10:lt5", PRE)


def test_lt_task_keeps_the_balanced_test_split_and_records_groups():
    full, lt = load_data("digits", PRE), load_data("digits:lt10", PRE)
    counts = np.bincount(lt.splits["train"].labels, minlength=10)
    n_max = counts[0]
    assert counts.tolist() == profile_counts(n_max, 10, 10).tolist()
    t0, t1 = full.splits["test"], lt.splits["test"]
    assert t1 is t0 or (np.array_equal(t0.labels, t1.labels) and np.array_equal(t0.images, t1.images))
    meta = lt.meta["long_tail"]
    assert meta["class_counts"] == counts.tolist() and meta["many_threshold"] == 100 and meta["few_threshold"] == 20
    assert meta["groups"] == shot_groups(counts) and lt.objective == "long_tail" and full.objective is None
    g = shot_groups(np.array([101, 100, 20, 19, 5]))
    assert g == {"many": [0], "medium": [1, 2], "few": [3, 4]}


def test_lt_composes_with_1k_in_either_order():
    base = load_data("digits:1k", PRE, seed=1)
    a, b = load_data("digits:lt5:1k", PRE, seed=1), load_data("digits:1k:lt5", PRE, seed=1)
    for split in ("train800", "train800val200", "val200", "test"):
        assert np.array_equal(a.splits[split].labels, b.splits[split].labels)
    for split in ("val200", "test"):
        assert np.array_equal(a.splits[split].labels, base.splits[split].labels)  # never touched
    for split in ("train800", "train800val200"):
        c = np.bincount(a.splits[split].labels, minlength=10)
        assert c.tolist() == profile_counts(c[0], 10, 5).tolist()  # each training split gets the profile


def test_imbalanced_data_selects_long_tail_by_default():
    imgs = np.zeros((230, 8, 8), np.uint8)
    labels = np.array([0] * 200 + [1] * 19 + [2] * 11)  # max/min = 18 > 10
    ds = ArrayImageDataset(imgs, labels, PRE)
    task = with_default_objective(TaskData("x", {"train": ds, "test": ds}, 3))
    assert task.objective == "long_tail" and task.meta["long_tail"]["class_counts"] == [200, 19, 11]
    mild = ArrayImageDataset(imgs[:60], np.array([0] * 30 + [1] * 20 + [2] * 10), PRE)
    assert with_default_objective(TaskData("y", {"train": mild, "test": mild}, 3)).objective is None
    one_k = {s: ds for s in ("train800", "val200", "train800val200", "test")}
    assert with_default_objective(TaskData("z", one_k, 3, "1k")).objective is None  # VTAB-1K keeps top-1


def _cifar_batch(path, rows, labels, key):
    with open(path, "wb") as fh:
        pickle.dump({"batch_label": "x", key: labels, "data": rows, "filenames": ["a"] * len(labels)}, fh, protocol=2)


def test_cifar_pickle_loaders(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    all_rows, all_labels = [], []
    for i in range(1, 6):
        rows = rng.integers(0, 256, (20, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, 20)]
        _cifar_batch(root / f"data_batch_{i}", rows, labels, "labels")
        all_rows.append(rows)
        all_labels += labels
    test_rows = rng.integers(0, 256, (10, 3072), dtype=np.uint8)
    _cifar_batch(root / "test_batch", test_rows, list(range(10)), "labels")
    with open(root / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, fh, protocol=2)
    pre = ImagePreprocess(size=(32, 32), mean=(0.0,) * 3, std=(1.0,) * 3)
    task = load_data(f"cifar10:{tmp_path}", pre)
    train = task.splits["train"]
    assert len(train) == 100 and train.labels.tolist() == all_labels and task.meta["class_names"][3] == "c3"
    # channel-major rows: pixel (y, x) of channel c is row[c * 1024 + y * 32 + x]
    x, _ = train[7]
    row = np.concatenate(all_rows)[7]
    assert abs(float(x[1, 2, 5]) - row[1024 + 2 * 32 + 5] / 255.0) < 1e-6
    assert load_data(f"cifar10:{root}", pre).splits["test"].labels.tolist() == list(range(10))

    c100 = tmp_path / "c100" / "cifar-100-python"
    c100.mkdir(parents=True)
    _cifar_batch(
        c100 / "train", rng.integers(0, 256, (300, 3072), dtype=np.uint8), [i % 100 for i in range(300)], "fine_labels"
    )
    _cifar_batch(c100 / "test", rng.integers(0, 256, (100, 3072), dtype=np.uint8), list(range(100)), "fine_labels")
    lt = load_data(f"cifar100:{tmp_path / 'c100'}:lt3", pre)
    assert (
        lt.num_classes == 100 and np.bincount(lt.splits["train"].labels).tolist() == profile_counts(3, 100, 3).tolist()
    )

    evil = tmp_path / "evil" / "cifar-10-batches-py"
    evil.mkdir(parents=True)
    with open(evil / "data_batch_1", "wb") as fh:
        pickle.dump(os.getcwd, fh)  # any global other than numpy's array rebuilders is refused
    with pytest.raises(DataError, match="only numpy arrays"):
        load_data(f"cifar10:{evil}", pre)
    with pytest.raises(DataError, match="no CIFAR-10"):
        load_data(f"cifar10:{tmp_path / 'nowhere'}", pre)


def test_class_balanced_sampler_is_balanced_seeded_and_rank_sliced():
    labels = np.array([0] * 90 + [1] * 9 + [2] * 1)
    s = ClassBalancedSampler(labels, 10, seed=0)
    s.set_epoch(2)
    drawn = [i for b in s for i in b]
    assert len(drawn) == len(labels)
    counts = np.bincount(labels[drawn], minlength=3)
    assert counts.max() - counts.min() <= 1  # classes visited in shuffled cycles: equal shares
    t = ClassBalancedSampler(labels, 10, seed=0)
    t.set_epoch(2)
    assert drawn == [i for b in t for i in b]
    t.set_epoch(3)
    assert drawn != [i for b in t for i in b]
    ranks = [ClassBalancedSampler(labels, 10, 0, rank=r, world_size=2) for r in (0, 1)]
    for r in ranks:
        r.set_epoch(2)
    merged = [i for a, b in zip(*ranks) for i in a + b]
    assert merged == drawn
    assert len(ClassBalancedSampler(labels, 10, 0, epoch_length="max").order()) == 3 * 90


def test_lt_val_split_is_balanced_disjoint_from_train_and_seeded():
    plain, task = load_data("digits:lt10-max60", PRE), load_data("digits:lt10-max60-val20", PRE)
    train, val = task.splits["train"], task.splits["val"]
    assert np.bincount(val.labels, minlength=10).tolist() == [20] * 10  # balanced
    assert val.base is train.base  # both drawn from the source's training pool ...
    assert not set(val.indices.tolist()) & set(train.indices.tolist())  # ... disjoint from the LT split
    assert np.array_equal(train.indices, plain.splits["train"].indices)  # -val leaves the LT draw as it was
    assert np.array_equal(task.splits["test"].labels, plain.splits["test"].labels)  # test untouched
    assert np.array_equal(val.base.labels[val.indices], val.labels)
    again, other = load_data("digits:lt10-max60-val20", PRE), load_data("digits:lt10-max60-val20", PRE, seed=1)
    assert np.array_equal(again.splits["val"].indices, val.indices)
    assert not np.array_equal(other.splits["val"].indices, val.indices)
    assert not set(other.splits["val"].indices.tolist()) & set(other.splits["train"].indices.tolist())
    meta = task.meta["long_tail"]
    assert meta["val_per_class"] == 20 and meta["spec"]["val_per_class"] == 20 and meta["class_counts"][0] == 60
    assert task.has("val") and task.split("val") is val and task.split("tune_train") is train  # protocol roles
    assert LongTailSpec.parse("lt100-max1000-val100") == LongTailSpec(100.0, "index", 1000, val_per_class=100)


def test_leftover_val_takes_only_unused_samples_and_names_short_classes():
    labels = np.repeat(np.arange(3), 10)
    kept = np.array([0, 1, 2, 3, 4, 5, 6, 10, 11, 20])  # class 0 keeps 7 (3 left), class 1 2 (8), class 2 1 (9)
    val = leftover_val_indices(labels, kept, 3, 3, seed=5)
    assert np.bincount(labels[val], minlength=3).tolist() == [3, 3, 3] and not set(val) & set(kept)
    assert set(val[labels[val] == 0]) == {7, 8, 9}  # class 0 has exactly 3 unused samples: all of them
    with pytest.raises(DataError, match="class 0: 3"):
        leftover_val_indices(labels, kept, 3, 4)


def test_lt_val_typed_errors():
    with pytest.raises(DataError, match="unused training samples"):
        load_data("digits:lt10-val20", PRE)  # no -max: the head class is kept whole, nothing left for val
    with pytest.raises(DataError, match=">= 1"):
        load_data("digits:lt10-max60-val0", PRE)
    with pytest.raises(DataError, match="drop -val"):
        load_data("digits:1k:lt5-max30-val5", PRE)  # the 1k protocol has val200 already
