"""thrifty.runtime.allocator: the CPU malloc setting that keeps freed large blocks for reuse."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from thrifty.errors import ConfigError
from thrifty.runtime.allocator import preloaded_allocator, tune_malloc
from thrifty.train import TrainConfig


GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# A "training step": 4 live 40-MB blocks, then all freed; minor page faults over 20 such steps. Blocks over 32 MB
# (glibc's largest adaptive mmap threshold) are always mmapped and unmapped by the system allocator.
FAULTS = """
import resource, sys, torch
from thrifty.runtime.allocator import tune_malloc
print(tune_malloc(sys.argv[1]), file=sys.stderr)
def step():
    return [torch.ones(10 << 20) for _ in range(4)]
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)}
    out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, env=env, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(not GLIBC, reason="glibc malloc only")
def test_tuned_malloc_reuses_freed_blocks_instead_of_faulting_them_in_again():
    system, tuned = _faults("system"), _faults("tuned")
    pages = 20 * 4 * (40 << 20) // 4096  # what re-faulting every block of every step costs
    assert system > pages * 9 // 10  # glibc unmaps every block on free and faults it in again
    assert tuned < pages // 5  # measured: 5-10 % (the heap grows a little now and then)


def test_modes_and_refusals(monkeypatch):
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    assert tune_malloc("system") == "system"
    applied = tune_malloc("tuned")
    assert applied == "tuned" if GLIBC else applied.startswith("unavailable:")
    with pytest.raises(ConfigError, match="malloc mode must be one of"):
        tune_malloc("jemalloc")
    with pytest.raises(ConfigError, match="`malloc` must be one of"):
        TrainConfig(malloc="fast")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
    assert preloaded_allocator() == "libtcmalloc_minimal.so.4"
    assert tune_malloc("tuned") == "preloaded:libtcmalloc_minimal.so.4"
