"""Dataset sources: `@register_dataset(name, takes_path=...)` on a loader; `load_data` resolves a spec string
`name[:PATH][:modifier...]` through this one table. Modifiers come last, in any order: `:1k` draws the
VTAB-1K-style few-sample protocol (train800 / val200 / train800val200 / test);
`:lt<IF>[-perm|-count][-max<N>][-val<N>]` gives the training split(s) the exponential long-tail profile (and with
`-val<N>` a balanced val split of unused training samples; thrifty.data.longtail; applied after the source and its
1k draw)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from thrifty.data.longtail import LT_MODIFIER
from thrifty.errors import DataError
from thrifty.registry import Registry


MODIFIERS = (re.compile(r"1k"), LT_MODIFIER)  # trailing `:<modifier>` tokens of a data spec
MODIFIER_HELP = ":1k (few-sample protocol), :lt<IF> (long-tailed training split)"


@dataclass(frozen=True)
class DatasetSource:
    """`load(path, preprocess, few_sample=..., seed=..., test_size=...) -> TaskData`."""

    name: str
    load: Callable[..., object]
    takes_path: bool
    help: str


DATASETS: Registry[DatasetSource] = Registry("dataset", builtins="thrifty.data.builtin")


def register_dataset(name: str, *, takes_path: bool = False, help: str = "") -> Callable:
    """Decorator: register a loader as dataset source `name` (`name:PATH` when `takes_path`)."""

    def wrap(load: Callable[..., object]) -> Callable[..., object]:
        DATASETS.register(name, DatasetSource(name, load, takes_path, help or (load.__doc__ or "").strip()))
        return load

    return wrap


def available_datasets() -> list[str]:
    return DATASETS.names()


def parse_data_spec(spec: str) -> tuple[DatasetSource, str | None, list[str]]:
    """'imagefolder:/data/x:1k' -> (source, '/data/x', ['1k']); 'fashion-mnist:lt100:1k' -> (source, None,
    ['lt100', '1k'])."""
    parts = spec.split(":")
    mods: list[str] = []
    while len(parts) > 1 and any(p.fullmatch(parts[-1]) for p in MODIFIERS):
        mods.insert(0, parts.pop())
    name, rest = parts[0], parts[1:]
    if name not in DATASETS:
        usage = ", ".join(f"{n}:PATH" if DATASETS.get(n).takes_path else n for n in available_datasets())
        raise DataError(f"unknown data spec {spec!r}; use one of {usage} (append {MODIFIER_HELP})")
    source = DATASETS.get(name)
    path = ":".join(rest) or None
    if source.takes_path and not path:
        raise DataError(f"data source {name!r} needs a path: {name}:PATH ({source.help})")
    if not source.takes_path and path is not None:
        raise DataError(f"data source {name!r} takes no path; unknown modifier in {spec!r} (known: {MODIFIER_HELP})")
    if sum(m == "1k" for m in mods) > 1 or sum(m.startswith("lt") for m in mods) > 1:
        raise DataError(f"{spec!r}: each modifier may appear once")
    return source, path, mods
