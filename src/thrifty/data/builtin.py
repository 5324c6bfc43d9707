"""The built-in dataset sources: VTAB-1K task folders, image folders and the packaged real datasets."""

from __future__ import annotations

import numpy as np

from thrifty.data.few_sample import stratified_sample
from thrifty.data.packaged import PACKAGED, image_folder
from thrifty.data.pools import from_pools
from thrifty.data.registry import register_dataset
from thrifty.data.vtab import load_vtab


@register_dataset(
    "vtab", takes_path=True, help="a VTAB-1K task folder: vtab:PATH/vtab-1k/<task> (always the 1k protocol)"
)
def _vtab(path, preprocess, *, few_sample: bool, seed: int, test_size: int | None):
    task = load_vtab(path, preprocess)
    t = task.splits["test"]
    if test_size is not None and test_size < len(t):
        rng = np.random.default_rng(seed)
        task.splits["test"] = t.subset(
            np.sort(stratified_sample(t.labels, test_size, rng, num_classes=task.num_classes))
        )
    return task


@register_dataset("imagefolder", takes_path=True, help="PATH/{train,test}/<class>/<image> (torchvision layout)")
def _imagefolder(path, preprocess, *, few_sample: bool, seed: int, test_size: int | None):
    return from_pools(
        f"imagefolder:{path}", image_folder(path), preprocess, few_sample=few_sample, seed=seed, test_size=test_size
    )


def _packaged(name: str) -> None:
    pools = PACKAGED[name]

    def load(path, preprocess, *, few_sample: bool, seed: int, test_size: int | None):
        return from_pools(name, pools(), preprocess, few_sample=few_sample, seed=seed, test_size=test_size)

    register_dataset(name, help=(pools.__doc__ or "").strip().split("\n")[0])(load)


for _name in PACKAGED:
    _packaged(_name)


def _cifar(num_classes: int) -> None:
    def load(path, preprocess, *, few_sample: bool, seed: int, test_size: int | None):
        from thrifty.data.cifar import cifar_pools

        pools = cifar_pools(path, num_classes)
        name = f"cifar{num_classes}:{path}"
        return from_pools(name, pools, preprocess, few_sample=few_sample, seed=seed, test_size=test_size)

    folder = "cifar-10-batches-py" if num_classes == 10 else "cifar-100-python"
    register_dataset(
        f"cifar{num_classes}",
        takes_path=True,
        help=f"CIFAR-{num_classes} python batches: cifar{num_classes}:PATH ({folder} or its parent); "
        f"append :lt100 for CIFAR-{num_classes}-LT",
    )(load)


for _n in (10, 100):
    _cifar(_n)


@register_dataset("movielens-100k", help="MovieLens-100K CTR table: rating >= 4, 8 fields, time-ordered 80/20")
def _movielens(path, preprocess, *, few_sample: bool, seed: int, test_size: int | None):
    from thrifty.data.tables import movielens_100k

    return movielens_100k(preprocess, few_sample=few_sample, seed=seed, test_size=test_size)


@register_dataset("adult", help="UCI Adult CTR table: income > 50K, 14 categorical fields, 39,000 / 9,842")
def _adult(path, preprocess, *, few_sample: bool, seed: int, test_size: int | None):
    from thrifty.data.tables import adult

    return adult(preprocess, few_sample=few_sample, seed=seed, test_size=test_size)
