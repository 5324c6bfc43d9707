"""Named outputs of a frozen backbone ("taps"): what side methods read and what the feature cache stores.

Names:
- `block.<i>`: output of block i (the residual stream after it), (B, N, D) (CNN: (B, C, H, W));
- `pooled`: the backbone's own pooled features `pool(norm(h_L))`, (B, num_features) (the linear probe reads it);
- `mask`: (B, N) bool, True for real tokens (text backbones: non-padding tokens).

`extract_taps` runs the backbone under `torch.no_grad()`: no tensor it returns carries an autograd graph, so
nothing inside the backbone is saved for backward, and the outputs are data (cacheable, shareable).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from thrifty.backbones import Backbone, Inputs
from thrifty.errors import ConfigError


POOLED = "pooled"
MASK = "mask"
BLOCK_PREFIX = "block."


def block_tap(index: int) -> str:
    """Name of the output of block `index` (a non-negative index)."""
    return f"{BLOCK_PREFIX}{index}"


def block_index(name: str) -> int | None:
    """Block index of a `block.<i>` name, None for other names."""
    if not name.startswith(BLOCK_PREFIX):
        return None
    try:
        return int(name[len(BLOCK_PREFIX) :])
    except ValueError:
        return None


def resolve_blocks(indices: Sequence[int] | None, num_blocks: int, what: str) -> list[int]:
    """Sorted, unique, non-negative block indices (negative ones count from the end); None means all blocks."""
    if indices is None:
        return list(range(num_blocks))
    out = set()
    for i in indices:
        if not isinstance(i, int) or not -num_blocks <= i < num_blocks:
            raise ConfigError(f"`{what}`: block index {i!r} is out of range for a backbone with {num_blocks} blocks")
        out.add(i % num_blocks)
    if not out:
        raise ConfigError(f"`{what}` selects no block")
    return sorted(out)


def canonical_taps(names: Iterable[str], num_blocks: int) -> list[str]:
    """Validate tap names for a backbone with `num_blocks` blocks; sorted: blocks ascending, pooled, mask."""
    blocks, others = set(), set()
    for name in names:
        idx = block_index(name)
        if idx is not None:
            if not -num_blocks <= idx < num_blocks:
                raise ConfigError(f"tap {name!r}: the backbone has blocks 0..{num_blocks - 1}")
            blocks.add(idx % num_blocks)
        elif name in (POOLED, MASK):
            others.add(name)
        else:
            raise ConfigError(f"unknown tap {name!r}; use block.<i>, {POOLED} or {MASK}")
    ordered = [block_tap(i) for i in sorted(blocks)]
    return ordered + [n for n in (POOLED, MASK) if n in others]


@torch.no_grad()
def extract_taps(backbone: Backbone, x: Inputs, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Run the frozen backbone once (no_grad) and return the named taps (see module docstring)."""
    n = len(backbone.blocks)
    names = canonical_taps(names, n)
    wanted = {block_index(t) for t in names} - {None}
    last = n - 1 if POOLED in names else max(wanted, default=-1)
    h, ctx = backbone.embed(x)
    out: dict[str, torch.Tensor] = {}
    for i in range(last + 1):
        h = backbone.run_block(i, h, ctx)
        if i in wanted:
            out[block_tap(i)] = h
    if POOLED in names:
        out[POOLED] = backbone.pool(backbone.norm(h), ctx).contiguous()  # a CLS view would pin all of (B, N, D)
    if MASK in names:
        mask = backbone.token_mask(ctx, h)
        out[MASK] = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device) if mask is None else mask.bool()
    return out
