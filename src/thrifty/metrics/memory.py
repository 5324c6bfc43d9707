"""Memory measurements: bytes saved for backward (deterministic) and peak memory of one training step.

`saved_activation_bytes` counts, with `torch.autograd.graph.saved_tensors_hooks`, every tensor autograd keeps
for the backward pass during one forward, de-duplicated by storage, *excluding parameters* (a frozen weight kept
to compute input gradients is not an activation). It is exact and device independent.

Peak memory: on CUDA `torch.cuda.max_memory_allocated` around the step. On CPU, the step runs in a fresh process
(`python -m thrifty.train.peak_worker`, glibc's mmap threshold fixed so freed tensors leave the resident set)
and we report the growth of its peak resident set (VmHWM, reset through /proc/self/clear_refs just before the
step, after a warm-up step and `malloc_trim`) over its resident set before the step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def _storage_key(t: torch.Tensor) -> tuple:
    try:
        s = t.untyped_storage()
        return (s.data_ptr(), s.nbytes())
    except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. some views)
        return (id(t), t.numel() * t.element_size())


def saved_activation_bytes(model: nn.Module, run: Callable[[], torch.Tensor]) -> int:
    """Bytes of the non-parameter tensors saved for backward while `run()` computes a loss."""
    param_keys = {_storage_key(p) for p in model.parameters()}
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in param_keys:
            seen[key] = key[1]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return int(sum(seen.values()))


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def training_step(
    model: nn.Module,
    inputs: Any,
    labels: torch.Tensor,
    optimizer: torch.optim.Optimizer | None,
    loss_fn: LossFn | None = None,
):
    """One forward/backward/update, as the training loop does it; `loss_fn(outputs, labels)` is the objective's
    loss (default: cross-entropy)."""
    outputs = model(inputs)
    loss = loss_fn(outputs, labels) if loss_fn is not None else nn.functional.cross_entropy(outputs, labels)
    if loss.requires_grad:
        loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss


def cuda_peak_step_bytes(
    model: nn.Module, inputs: Any, labels: torch.Tensor, optimizer, loss_fn: LossFn | None = None
) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    training_step(model, inputs, labels, optimizer, loss_fn)
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - base)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    """Give freed heap memory back to the OS (glibc), so RSS before the step holds only live memory."""
    import contextlib
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def cpu_peak_growth(step: Callable[[], Any]) -> int:
    """Peak RSS growth (bytes) while `step()` runs in this process; call it in a fresh process."""
    import gc

    gc.collect()
    _malloc_trim()
    if not reset_peak_rss():
        raise OSError("cannot reset the peak RSS (/proc/self/clear_refs); peak memory is unavailable here")
    before = _status_kb("VmRSS")
    step()
    return max(0, (_status_kb("VmHWM") - before) * 1024)
