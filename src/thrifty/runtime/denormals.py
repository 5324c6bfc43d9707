"""CPU numerics setting for training loops: flush subnormal floats to zero (FTZ/DAZ) on every thread torch uses.

Why: subnormal floats (|x| < 1.2e-38 in float32) take a slow microcode path on x86 cores. They appear as training
sharpens attention (probabilities and their gradients underflow): LAST on a ViT-B/16 feature cache spends 5.3 s
per epoch in backward in epoch 2 and 7.3-7.6 s from epoch 5 on with subnormals kept, and 5.0-5.4 s throughout
with them flushed (docs/benchmarks-more.md, "Side-tuning speed claims"). TensorFlow flushes them on CPU by default.

`torch.set_flush_denormal` only sets the calling thread's MXCSR register, and threads copy it when they are
created, so torch's OpenMP pool, created by the first parallel op (loading the backbone, extraction), keeps
computing with subnormals. `flushed_denormals` therefore runs the setting on every thread of that pool too (one
`GOMP_parallel` region of torch's own libgomp, through ctypes), and puts the previous setting back on exit.
Only values below 1.2e-38 change (read and written as 0). On CUDA, and on CPUs without FTZ/DAZ, it does nothing.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch


_REGION = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


def thread_flushes_denormals() -> bool:
    """Whether the calling thread reads a subnormal float32 as 0 (FTZ/DAZ set in its MXCSR)."""
    subnormal = torch.tensor([1 << 20], dtype=torch.int32).view(torch.float32)  # 2^-129 (a literal would be flushed)
    return subnormal.mul(1.0).item() == 0.0


_OPENMP_LIBS = ("libgomp.so.1", "libiomp5.so", "libomp.so")  # GNU (pip wheels), Intel, LLVM (both export GOMP_*)


@functools.cache
def _openmp_runtime() -> ctypes.CDLL | None:
    """The OpenMP runtime torch loaded in this process (RTLD_NOLOAD: never a second copy), else None; looked up
    once (torch loads it at import), with `GOMP_parallel`'s signature declared."""
    if platform.system() != "Linux":
        return None
    for name in _OPENMP_LIBS:
        try:
            lib = ctypes.CDLL(name, mode=os.RTLD_NOLOAD)
        except OSError:
            continue
        if hasattr(lib, "GOMP_parallel"):
            lib.GOMP_parallel.argtypes = [_REGION, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
            lib.GOMP_parallel.restype = None
            return lib
    return None


def set_flush_denormal_all(on: bool) -> int:
    """`torch.set_flush_denormal(on)` on the calling thread and on every thread of torch's OpenMP pool (a team of
    `torch.get_num_threads()`); returns how many distinct threads now have `on` in effect (0: unsupported CPU)."""
    if not torch.set_flush_denormal(on):
        return 0
    gomp = _openmp_runtime()
    if gomp is None:
        return 1
    done: set[int] = set()
    lock = threading.Lock()

    def region(_: int | None) -> None:  # runs once on each thread of the team, the caller included
        torch.set_flush_denormal(on)
        if thread_flushes_denormals() == on:
            with lock:
                done.add(threading.get_native_id())

    gomp.GOMP_parallel(_REGION(region), None, max(1, torch.get_num_threads()), 0)
    return len(done)


@contextmanager
def flushed_denormals(enabled: bool = True, device: str | torch.device = "cpu") -> Iterator[str]:
    """Flush subnormals to zero on all of torch's CPU threads inside the block (if `enabled` and `device` is the
    CPU); yields what is in effect: 'flushed (N of T threads)' (T = torch.get_num_threads()), 'kept' (disabled,
    or another device) or 'unsupported'. The previous setting is restored on exit."""
    if not enabled or torch.device(device).type != "cpu":
        yield "kept"
        return
    before = thread_flushes_denormals()
    threads = set_flush_denormal_all(True)
    try:
        yield f"flushed ({threads} of {torch.get_num_threads()} threads)" if threads else "unsupported"
    finally:
        if threads and not before:
            set_flush_denormal_all(False)
