"""CPU allocator setting for training loops: keep freed large blocks for reuse (glibc malloc).

Why: a CPU training step allocates and frees many large tensors (LAST on ViT-B/16: tens of (32, 197, 768) float32
activations, ~19 MB each, per step). glibc serves blocks over its mmap threshold (128 KB, adapting up to 32 MB) with
fresh `mmap`s and returns them on `free`, so every step page-faults and zeroes those pages again (measured in
docs/benchmarks-more.md, "Side-tuning speed claims").

`tune_malloc("tuned")` raises glibc's mmap and trim thresholds to 1 GiB (`mallopt`), so the freed blocks stay in
the heap and the next step reuses them. The cost: the process keeps up to 1 GiB of freed memory instead of
returning it to the OS. It is process-wide and lasts until exit; child processes (the fresh-process peak-memory
worker) are not affected. `"system"` leaves the allocator alone; on a non-glibc platform, or with another
allocator preloaded (`LD_PRELOAD=libtcmalloc...`, which already reuses blocks), nothing is changed.
"""

from __future__ import annotations

import ctypes
import os
import platform

from thrifty.errors import ConfigError


MALLOC_MODES = ("tuned", "system")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc malloc.h
_THRESHOLD = 1 << 30


def preloaded_allocator() -> str | None:
    """The malloc replacement named in LD_PRELOAD (tcmalloc, jemalloc, mimalloc), if any."""
    for lib in os.environ.get("LD_PRELOAD", "").replace(":", " ").split():
        name = os.path.basename(lib)
        if any(k in name for k in ("tcmalloc", "jemalloc", "mimalloc")):
            return name
    return None


def tune_malloc(mode: str = "tuned") -> str:
    """Apply `mode` (one of MALLOC_MODES) to this process's allocator; returns what is in effect:
    'tuned', 'system', 'preloaded:<lib>' or 'unavailable:<reason>'."""
    if mode not in MALLOC_MODES:
        raise ConfigError(f"malloc mode must be one of {MALLOC_MODES}, got {mode!r}")
    preloaded = preloaded_allocator()
    if preloaded:
        return f"preloaded:{preloaded}"
    if mode == "system":
        return "system"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return f"unavailable:{platform.system()} {platform.libc_ver()[0] or 'libc'} (not glibc)"
    libc = ctypes.CDLL(None)
    ok = libc.mallopt(_M_MMAP_THRESHOLD, _THRESHOLD) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _THRESHOLD) == 1
    return "tuned" if ok else "unavailable:mallopt refused the thresholds"
