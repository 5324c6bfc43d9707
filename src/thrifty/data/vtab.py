"""The VTAB-1K folder format of the PETL literature (NOAH's `get_vtab1k.py` export).

    vtab-1k/<task>/{train800,val200,train800val200,test}.txt     lines: `images/<split>/NNNNNN.jpg <label>`
    vtab-1k/<task>/images/<split>/NNNNNN.jpg

Protocol "1k": train on train800val200, report test; tune on train800 / val200 (never select on test).
"""

from __future__ import annotations

import os

import numpy as np

from thrifty.backbones.preprocess import ImagePreprocess
from thrifty.data.base import FileImageDataset, TaskData
from thrifty.errors import DataError


# canonical order (result-table columns), group, class count
VTAB_TASKS: dict[str, tuple[str, int]] = {
    "cifar": ("natural", 100),
    "caltech101": ("natural", 102),
    "dtd": ("natural", 47),
    "oxford_flowers102": ("natural", 102),
    "oxford_iiit_pet": ("natural", 37),
    "svhn": ("natural", 10),
    "sun397": ("natural", 397),
    "patch_camelyon": ("specialized", 2),
    "eurosat": ("specialized", 10),
    "resisc45": ("specialized", 45),
    "diabetic_retinopathy": ("specialized", 5),
    "clevr_count": ("structured", 8),
    "clevr_dist": ("structured", 6),
    "dmlab": ("structured", 6),
    "kitti": ("structured", 4),
    "dsprites_loc": ("structured", 16),
    "dsprites_ori": ("structured", 16),
    "smallnorb_azi": ("structured", 18),
    "smallnorb_ele": ("structured", 9),
}
VTAB_ALIASES: dict[str, str] = {
    "cifar100": "cifar",
    "cifar_100": "cifar",
    "flowers102": "oxford_flowers102",
    "oxford_flowers": "oxford_flowers102",
    "oxford_pet": "oxford_iiit_pet",
    "pets": "oxford_iiit_pet",
    "pet": "oxford_iiit_pet",
    "camelyon": "patch_camelyon",
    "pcam": "patch_camelyon",
    "retinopathy": "diabetic_retinopathy",
    "clevr_distance": "clevr_dist",
    "dsprites_location": "dsprites_loc",
    "dsprites_orientation": "dsprites_ori",
    "smallnorb_azimuth": "smallnorb_azi",
    "smallnorb_elevation": "smallnorb_ele",
    "kitti_distance": "kitti",
    "sun": "sun397",
    "caltech": "caltech101",
}
VTAB_SPLITS = ("train800", "val200", "train800val200", "test")


def canonical_task(name: str) -> str:
    """`cifar100` / `cifar_100` / `CIFAR-100` -> `cifar`; unknown names raise DataError listing the tasks."""
    key = name.strip().lower().replace("-", "_")
    key = VTAB_ALIASES.get(key, key)
    if key not in VTAB_TASKS:
        raise DataError(f"unknown VTAB-1K task {name!r}; known: {', '.join(VTAB_TASKS)}")
    return key


def _task_dir(path: str) -> tuple[str, str]:
    """Resolve `.../vtab-1k/<task or alias>` to the folder on disk and the canonical task name."""
    path = path.rstrip("/")
    root, given = os.path.dirname(path), os.path.basename(path)
    task = canonical_task(given)
    candidates = [path, os.path.join(root, task)] + [
        os.path.join(root, a) for a, t in VTAB_ALIASES.items() if t == task
    ]
    for c in candidates:
        if os.path.isdir(c):
            return c, task
    raise DataError(
        f"VTAB-1K task folder not found: tried {candidates[:3]}...; expected vtab-1k/<task>/ with "
        f"{', '.join(s + '.txt' for s in VTAB_SPLITS)}"
    )


def parse_split_file(path: str, num_classes: int) -> tuple[list[str], list[int]]:
    """Parse `images/<split>/NNNNNN.jpg <label>` lines; CRLF and trailing blanks are tolerated."""
    if not os.path.isfile(path):
        raise DataError(f"missing split file {path}; a VTAB-1K task folder needs {', '.join(VTAB_SPLITS)} .txt")
    base = os.path.dirname(path)
    paths, labels = [], []
    with open(path, newline=None) as fh:
        for n, raw in enumerate(fh, 1):
            line = raw.strip()
            if not line:
                continue
            parts = line.rsplit(None, 1)
            if len(parts) != 2:
                raise DataError(f"{path}:{n}: malformed line {line!r}; expected '<image path> <integer label>'")
            rel, lab = parts
            try:
                label = int(lab)
            except ValueError:
                raise DataError(f"{path}:{n}: label {lab!r} is not an integer") from None
            if not 0 <= label < num_classes:
                raise DataError(f"{path}:{n}: label {label} outside [0, {num_classes}) for this task")
            full = os.path.join(base, rel)
            if not os.path.isfile(full):
                raise DataError(f"{path}:{n}: image {full} is missing")
            paths.append(full)
            labels.append(label)
    if not paths:
        raise DataError(f"split file {path} has no samples")
    return paths, labels


def load_vtab(path: str, preprocess: ImagePreprocess) -> TaskData:
    """Load one VTAB-1K task folder under protocol '1k'."""
    if preprocess.kind != "image":
        raise DataError("VTAB-1K tasks are images; pick an image backbone")
    folder, task = _task_dir(path)
    group, num_classes = VTAB_TASKS[task]
    splits = {}
    for split in VTAB_SPLITS:
        paths, labels = parse_split_file(os.path.join(folder, f"{split}.txt"), num_classes)
        splits[split] = FileImageDataset(paths, np.asarray(labels), preprocess)
    return TaskData(
        name=f"vtab:{task}", splits=splits, num_classes=num_classes, protocol="1k", meta={"group": group, "task": task}
    )
