"""Which MLP hidden units a compressed block keeps (the set S of spec §3.2).

- `rand_sample` (the reference's official runs): a uniformly random subset, from a seeded generator.
- `gelu_positive` (our choice; the reference's `GELU_sample` reads a precomputed per-block `GELU_array` whose
  computation is NOT FOUND): units ranked by how often their activation output is positive on the few-shot inputs
  (mean |activation| breaks ties). The only trace of the statistic in the reference is a commented-out allocation
  in `get_structure.py` that counts "GELU>0" per block, hence this count. Labels are not involved.

When a block that already holds units C must keep k of its H original units (dense families shrink or grow
blocks): k <= |C| keeps k of C; k > |C| keeps C and adds k - |C| units from the teacher block's remaining ones.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from thrifty.compress.dc_vit.block import BlockOps
from thrifty.compress.dc_vit.data import batches_of


@torch.no_grad()
def activation_stats(
    backbone: nn.Module, index: int, inputs: Any, ops: BlockOps, batch_size: int = 64
) -> torch.Tensor:
    """(H,) score per hidden unit of block `index`: fraction of real tokens with a positive activation output,
    plus 1e-6 x mean |activation| (a tie-break)."""
    block = backbone.blocks[index]
    grabbed: list[torch.Tensor] = []
    handle = ops.act_module(block).register_forward_hook(lambda m, i, o: grabbed.append(o.detach()))
    pos, mag, count = None, None, 0
    try:
        for x in batches_of(inputs, batch_size):
            h, ctx = backbone.embed(x)
            for i in range(index + 1):
                h = backbone.run_block(i, h, ctx)
            act = grabbed.pop()  # (B, N, H)
            mask = backbone.token_mask(ctx, h)
            flat = act.reshape(-1, act.shape[-1]) if mask is None else act[mask.bool()]
            p, a = (flat > 0).float().sum(0), flat.abs().sum(0)
            pos, mag = (p, a) if pos is None else (pos + p, mag + a)
            count += flat.shape[0]
    finally:
        handle.remove()
    return pos / count + 1e-6 * mag / count


def select_units(
    ops: BlockOps,
    student_block: nn.Module,
    k: int,
    how: str,
    generator: torch.Generator,
    student_stats: torch.Tensor | None = None,
    teacher_stats: torch.Tensor | None = None,
    hidden: int | None = None,
) -> list[int]:
    """Sorted original indices of the k units to keep (see the module docstring). `*_stats` are the (H,) scores
    of the student's current units (in its unit order) and of the teacher's units, for `gelu_positive`."""
    current = ops.units(student_block)
    hidden = hidden or ops.hidden(student_block)
    if k <= len(current):
        if how == "rand_sample":
            pick = torch.randperm(len(current), generator=generator)[:k].tolist()
        else:
            pick = torch.argsort(student_stats, descending=True, stable=True)[:k].tolist()
        return sorted(current[i] for i in pick)
    held = set(current)
    rest = [u for u in range(hidden) if u not in held]
    extra = k - len(current)
    if how == "rand_sample":
        add = [rest[i] for i in torch.randperm(len(rest), generator=generator)[:extra].tolist()]
    else:
        scores = teacher_stats[torch.tensor(rest, dtype=torch.long)]
        add = [rest[i] for i in torch.argsort(scores, descending=True, stable=True)[:extra].tolist()]
    return sorted(current + add)
