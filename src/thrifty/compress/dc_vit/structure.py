"""Stage 0 of DC-ViT (spec §3.2, reference `flops2structure`): the structure from a MAC budget.

    R = (1 - keep) · M                       # MACs to remove; needs R >= M_a
    n = ceil(R / (M_a + M_m))                # blocks to modify
    r = b · (1 - (R - n·M_a) / (n·M_m))      # new MLP ratio, shared by the n blocks (b = H / D, 4 in a ViT)

M, M_a (one attention branch) and M_m (one full MLP) are counted on the real model (thrifty.compress.dc_vit.macs);
each modified block keeps int(D · r) of its H hidden units. The block-dropping baseline removes the whole-block
count whose MACs are nearest R (at least one).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from thrifty.compress.dc_vit.block import BlockOps, block_ops
from thrifty.compress.dc_vit.macs import MacProfile, count_macs, macs_of, module_names
from thrifty.errors import ConfigError, SpecError


def find_backbone(model: nn.Module) -> nn.Module:
    """The thrifty Backbone inside `model` (a TunedModel's `.backbone`, or the Backbone itself)."""
    from thrifty.backbones import Backbone

    if isinstance(model, Backbone):
        return model
    bb = getattr(model, "backbone", None)
    if isinstance(bb, Backbone):
        return bb
    raise SpecError(
        f"DC-ViT compresses a thrifty Backbone or a model holding one as `.backbone` (TunedModel), got "
        f"{type(model).__name__}; build it with thrifty.backbones.load_backbone"
    )


def example_inputs(backbone: nn.Module, device: torch.device | None = None) -> Any:
    """One input at the backbone's default size (all tokens real for text), on `device`."""
    x = backbone.random_inputs(1, seed=0)
    device = device or next(backbone.parameters()).device
    return {k: v.to(device) for k, v in x.items()} if isinstance(x, dict) else x.to(device)


def profile_macs(model: nn.Module, convention: str = "torch", ops: BlockOps | None = None) -> MacProfile:
    """Count `model` at batch 1 and split each block into its attention branch and MLP."""
    backbone = find_backbone(model)
    ops = ops or block_ops(backbone)
    total, per_module = count_macs(model, example_inputs(backbone), convention)
    attention, mlp, hidden = [], [], []
    for block in backbone.blocks:
        if ops.is_compressed(block):
            attention.append(0)
            mlp.append(0 if not ops.units(block) else macs_of(per_module, module_names(model, ops.mlp_modules(block))))
            hidden.append(len(ops.units(block)))
            continue
        attention.append(macs_of(per_module, module_names(model, ops.attention_modules(block))))
        mlp.append(macs_of(per_module, module_names(model, ops.mlp_modules(block))))
        hidden.append(ops.hidden(block))
    dim = int(ops.fc1(backbone.blocks[0]).in_features) if not ops.is_compressed(backbone.blocks[0]) else 0
    dim = dim or int(getattr(backbone, "num_features", 0))
    return MacProfile(convention, int(total), tuple(attention), tuple(mlp), tuple(hidden), dim)


@dataclass(frozen=True)
class Structure:
    """What a budget asks for: modify `num_blocks` blocks, each keeping `kept_units` of `hidden` MLP units
    (`kept_units=None`: the block is dropped). `predicted_macs` follows from the counted profile."""

    variant: str
    keep: float
    total_macs: int
    removed_macs: float
    attention_macs: float
    mlp_macs: float
    num_blocks: int
    mlp_ratio: float | None
    base_ratio: float
    dim: int
    hidden: int
    kept_units: int | None
    predicted_macs: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _uniform(profile: MacProfile, candidates: list[int]) -> tuple[float, float, int]:
    ma = sum(profile.attention[c] for c in candidates) / len(candidates)
    mm = sum(profile.mlp[c] for c in candidates) / len(candidates)
    hidden = profile.hidden[candidates[0]]
    if ma <= 0 or mm <= 0:
        raise SpecError(f"candidate blocks {candidates} have no counted attention or MLP MACs; are they compressed?")
    return ma, mm, hidden


def dc_vit_structure(
    profile: MacProfile, keep: float, candidates: list[int], num_blocks: int | None = None
) -> Structure:
    """The spec's formula on a counted profile. ConfigError where the budget is out of DC-ViT's reach: keep >= 1,
    R < M_a (less than one attention branch), or more blocks than `candidates` needed."""
    if not 0.0 < keep < 1.0:
        raise ConfigError(f"`keep_macs` must lie in (0, 1), got {keep!r}; keep_macs >= 1 removes nothing")
    ma, mm, hidden = _uniform(profile, candidates)
    total, dim = profile.total, profile.dim
    base = hidden / dim
    removed = (1.0 - keep) * total
    if removed < ma:
        raise ConfigError(
            f"keep_macs={keep} removes {removed:,.0f} MACs, less than one attention branch ({ma:,.0f} of "
            f"{total:,} counted); the largest budget DC-ViT reaches is keep_macs={1 - ma / total:.6f}"
        )
    lowest = 1.0 - len(candidates) * (ma + mm) / total
    n = math.ceil(removed / (ma + mm) - 1e-12) if num_blocks is None else int(num_blocks)
    if n > len(candidates):
        raise ConfigError(
            f"keep_macs={keep} is below what removing the attention and the whole MLP of every candidate block "
            f"allows ({len(candidates)} blocks {candidates}): the smallest budget is keep_macs={lowest:.6f}; "
            "raise keep_macs or pass more `candidates`"
        )
    ratio = base * (1.0 - (removed - n * ma) / (n * mm))
    if not 0.0 <= ratio <= base + 1e-9:
        raise ConfigError(
            f"num_blocks={n} cannot meet keep_macs={keep}: it needs MLP ratio {ratio:.4f}, outside [0, {base:g}]; "
            f"leave num_blocks unset (the formula picks {math.ceil(removed / (ma + mm))})"
        )
    kept = min(hidden, int(dim * ratio))
    predicted = total - n * ma - n * mm * (1.0 - kept / hidden)
    return Structure("dc_vit", keep, total, removed, ma, mm, n, ratio, base, dim, hidden, kept, predicted)


def block_drop_structure(profile: MacProfile, keep: float, candidates: list[int]) -> Structure:
    """The baseline: drop the number of whole blocks whose MACs are nearest the budget (at least one)."""
    if not 0.0 < keep < 1.0:
        raise ConfigError(f"`keep_macs` must lie in (0, 1), got {keep!r}; keep_macs >= 1 removes nothing")
    ma, mm, hidden = _uniform(profile, candidates)
    total = profile.total
    removed = (1.0 - keep) * total
    n = max(1, round(removed / (ma + mm)))
    if n > len(candidates):
        raise ConfigError(
            f"keep_macs={keep} needs dropping {n} blocks but only {len(candidates)} are candidates; the smallest "
            f"budget is keep_macs={1.0 - len(candidates) * (ma + mm) / total:.6f}"
        )
    base = hidden / profile.dim
    predicted = total - n * (ma + mm)
    return Structure("block_drop", keep, total, removed, ma, mm, n, None, base, profile.dim, hidden, None, predicted)


def default_candidates(num_blocks: int, candidates: list[int] | None) -> list[int]:
    """`candidates` checked against the depth; default every block but the first and the last (reference 1..10
    of ViT-B's 12)."""
    if candidates is None:
        if num_blocks < 3:
            raise ConfigError(f"a {num_blocks}-block model has no block between its first and last; pass candidates")
        return list(range(1, num_blocks - 1))
    bad = [c for c in candidates if not 0 <= c < num_blocks]
    if bad:
        raise ConfigError(f"`candidates` {bad} are not blocks of this {num_blocks}-block model")
    return sorted(candidates)


def apply_structure_(backbone: nn.Module, blocks: dict[int, list[int] | None]) -> None:
    """Rebuild `backbone`'s blocks in place to a saved structure: block -> kept original units (None: dropped).
    The weights are placeholders until a state dict is loaded (`load_dc_vit`)."""
    ops = block_ops(backbone)
    for index, units in sorted(blocks.items()):
        index = int(index)
        if not 0 <= index < len(backbone.blocks):
            raise ConfigError(f"structure names block {index}, but the model has {len(backbone.blocks)} blocks")
        block = backbone.blocks[index]
        new = ops.drop(block) if units is None else ops.compress(block, block, list(range(len(units))))
        if units is not None:
            new.units = [int(u) for u in units]
        backbone.blocks[index] = new
