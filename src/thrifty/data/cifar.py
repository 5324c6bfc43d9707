"""CIFAR-10 / CIFAR-100 from the standard python-pickle batches users have on disk (`cifar10:PATH`,
`cifar100:PATH`); with `:lt<IF>` they give the literature's CIFAR-10/100-LT (longtail-ssl.md §6).

    cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}     keys data (N, 3072) uint8, labels
    cifar-100-python/{train, test, meta}                                keys data, fine_labels (coarse_labels)

PATH is that folder or its parent. Rows are 3x32x32 channel-major (R plane, G, B) -> (N, 32, 32, 3) uint8.
The files are pickles: they are read with a restricted unpickler that builds only dicts, lists, strings, numbers
and numpy arrays (any other global in the file raises DataError), so a tampered file cannot run code.
"""

from __future__ import annotations

import os
import pickle
from typing import Any

import numpy as np

from thrifty.data.packaged import Pools
from thrifty.errors import DataError


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),  # bytes pickled by Python 3 with protocol 2
}
LAYOUTS = {
    10: ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels"),
    100: ("cifar-100-python", ["train"], ["test"], "fine_labels"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise DataError(f"CIFAR batch refers to {module}.{name}; only numpy arrays are allowed in these files")
        return super().find_class(module, name)


def read_batch(path: str) -> dict[str, Any]:
    """One pickled batch as a dict with str keys (the Python 2 files need latin1, as torchvision reads them)."""
    try:
        with open(path, "rb") as fh:
            obj = _SafeUnpickler(fh, encoding="latin1").load()
    except FileNotFoundError as exc:
        raise DataError(f"CIFAR batch {path} is missing; point cifarN:PATH at the extracted python version") from exc
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise DataError(f"{path} is not a CIFAR python batch ({exc})") from exc
    if not isinstance(obj, dict):
        raise DataError(f"{path} holds a {type(obj).__name__}, not a CIFAR batch dict")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _root(path: str, folder: str) -> str:
    if os.path.isdir(os.path.join(path, folder)):
        return os.path.join(path, folder)
    return path


def _images(rows: np.ndarray, source: str) -> np.ndarray:
    rows = np.asarray(rows)
    if rows.dtype != np.uint8 or rows.ndim != 2 or rows.shape[1] != 3072:
        raise DataError(f"{source}: `data` must be (N, 3072) uint8 rows, got {rows.dtype} {rows.shape}")
    return rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()


def _load(path: str, files: list[str], key: str) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for f in files:
        batch = read_batch(os.path.join(path, f))
        if "data" not in batch or key not in batch:
            raise DataError(f"{os.path.join(path, f)} lacks `data` or `{key}`; is it the right CIFAR version?")
        xs.append(_images(batch["data"], f))
        ys.append(np.asarray(batch[key], np.int64))
        if len(xs[-1]) != len(ys[-1]):
            raise DataError(f"{os.path.join(path, f)}: {len(xs[-1])} images but {len(ys[-1])} labels")
    return np.concatenate(xs), np.concatenate(ys)


def cifar_pools(path: str, num_classes: int) -> Pools:
    """Train/test pools of CIFAR-10 or CIFAR-100 (fine labels) from the python batches under `path`."""
    folder, train_files, test_files, key = LAYOUTS[num_classes]
    root = _root(path, folder)
    if not os.path.isfile(os.path.join(root, train_files[0])):
        raise DataError(
            f"no CIFAR-{num_classes} python batches at {path} (expected {folder}/{train_files[0]}); download and "
            f"extract cifar-{num_classes}-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html"
        )
    train, test = _load(root, train_files, key), _load(root, test_files, key)
    names = None
    meta_file = os.path.join(root, "batches.meta" if num_classes == 10 else "meta")
    if os.path.isfile(meta_file):
        names = read_batch(meta_file).get("label_names" if num_classes == 10 else "fine_label_names")
    for split, (_, y) in (("train", train), ("test", test)):
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise DataError(f"CIFAR-{num_classes} {split} labels outside [0, {num_classes}) in {root}")
    return Pools(
        "image_array", train, test, num_classes, list(names) if names else None, description=f"CIFAR-{num_classes}"
    )
