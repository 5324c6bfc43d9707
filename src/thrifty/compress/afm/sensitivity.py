"""Sensitivity of the model's output to one target's rank, on the proxy set (the AAFM score is NOT FOUND in the
paper; this is the choice made here, docs/methods.md "AFM"):

    D_t(k) = Σ_x ‖f_{t,k}(x) − f(x)‖² / Σ_x ‖f(x) − f̄‖²

f = the model's output (logits of a TunedModel, pooled features of a Backbone), f_{t,k} = the same model with only
target t factorized at rank k. Numerator and denominator are sums, all-reduced under torchrun.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from thrifty.compress.afm.ranks import Target
from thrifty.compress.afm.stats import distributed
from thrifty.compress.calibration import iter_inputs
from thrifty.runtime import to_device
from thrifty.tuners.targeting import set_submodule


def _reduce(value: float, device: torch.device) -> float:
    if not distributed():
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item())


@torch.no_grad()
def make_scorer(
    root: nn.Module, batches: list[Any], samples: int, build: Callable[[Target, int], nn.Module]
) -> Callable[[Target, int], float]:
    """`score(target, rank)` = D_t(k) on the first `samples` proxy samples (see module docstring)."""
    device = next(root.parameters()).device
    was_training = root.training
    root.eval()
    inputs = [to_device(x, device) for x in iter_inputs(batches, samples)]
    refs = [root(x).double() for x in inputs]
    count = _reduce(float(sum(r.shape[0] for r in refs)), device)
    mean = torch.stack([r.sum(0) for r in refs]).sum(0)
    if distributed():
        import torch.distributed as dist

        dist.all_reduce(mean)
    mean = mean / max(count, 1.0)
    denom = _reduce(float(sum(((r - mean) ** 2).sum() for r in refs)), device)
    root.train(was_training)

    def score(target: Target, rank: int) -> float:
        original = root.get_submodule(target.name)
        set_submodule(root, target.name, build(target, rank))
        root.eval()
        try:
            with torch.no_grad():
                num = sum(float(((root(x).double() - r) ** 2).sum()) for x, r in zip(inputs, refs))
        finally:
            set_submodule(root, target.name, original)
            root.train(was_training)
        return _reduce(num, device) / max(denom, 1e-30)

    return score
