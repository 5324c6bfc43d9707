"""Progress of long compression steps (calibration passes, range searches, per-block / per-layer fits, export).

Library code stays quiet by default; it reports through the standard `logging` logger `thrifty.compress`. When that
logger is enabled for INFO (the `thrifty compress` / `thrifty quantize` commands do it, on stderr; a script can do
`logging.basicConfig(level=logging.INFO)`), the steps print one line when they start and end (with the seconds they
took) and show tqdm bars (rate and time left) over their batches, blocks or layers:

    for i in progress_bar(range(n), desc="QwT blocks"): ...
    with stage("PTQ ranges"): ...
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from tqdm.auto import tqdm


LOG = logging.getLogger("thrifty.compress")
T = TypeVar("T")


def progress_enabled() -> bool:
    """Whether compression steps report progress (the `thrifty.compress` logger is enabled for INFO)."""
    return LOG.isEnabledFor(logging.INFO)


def progress_bar(iterable: Iterable[T] | None = None, **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr that shows only when progress is enabled; cleared when done (`leave=False`)."""
    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, disable=not progress_enabled(), **kwargs)


@contextmanager
def stage(name: str) -> Iterator[dict[str, Any]]:
    """Log `name ...` before and `name: done in S s [note]` after the block; the block may set `info["note"]`."""
    info: dict[str, Any] = {}
    LOG.info("%s ...", name)
    t0 = time.perf_counter()
    yield info
    info["seconds"] = time.perf_counter() - t0
    note = f" ({info['note']})" if info.get("note") else ""
    LOG.info("%s: done in %.1f s%s", name, info["seconds"], note)
