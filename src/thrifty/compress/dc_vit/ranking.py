"""Stage 2 of DC-ViT (spec §3.2, reference `metric_blks.py`): rank candidate blocks by recoverability.

    for b in candidates:  student = teacher with block b replaced; recover on the few-shot set;
                          metric(b) = KLLoss(teacher, student) on the held-apart metric set
    order = candidates sorted by metric, ascending (ties by block index)

The reference's metric set is 50 DeepInversion images of the teacher (stage 1, not implemented here: 2000
optimisation steps per batch); we use held-apart real inputs, `metric_samples` of them, disjoint from the few-shot
set (or any inputs the caller passes). Resumable: each finished candidate is written to `ranking.json`, the best
recovered student so far to `ranking_best.safetensors` (progressive step 1 starts from it, as in the reference).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from thrifty.compress.dc_vit.block import BlockOps
from thrifty.compress.dc_vit.config import DCViTConfig
from thrifty.compress.dc_vit.data import Inputs
from thrifty.compress.dc_vit.recover import recover_, recoverability
from thrifty.compress.dc_vit.structure import find_backbone
from thrifty.compress.dc_vit.units import activation_stats, select_units
from thrifty.io import load_tensors, read_json, save_tensors, write_json


RANKING_NAME = "ranking.json"
BEST_NAME = "ranking_best.safetensors"


@dataclass
class Ranking:
    """Candidates ordered by recoverability (best first) and each one's metric; `best_state` is the recovered
    student of the best candidate (its state dict), `best_units` the units its replaced block kept."""

    order: list[int]
    metrics: dict[int, float]
    kept_units: int | None
    metric: str
    best_state: dict[str, torch.Tensor] | None = None
    best_units: list[int] | None = None
    losses: dict[int, list[float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "order": self.order,
            "metrics": {str(k): v for k, v in self.metrics.items()},
            "kept_units": self.kept_units,
            "metric": self.metric,
            "best_units": self.best_units,
            "final_losses": {str(k): (v[-1] if v else None) for k, v in self.losses.items()},
        }


def unit_seed(seed: int, block: int, held: int, k: int | None) -> int:
    """The generator seed of one unit selection: the same (block, units held, units kept) gives the same subset,
    so the ranking's best candidate and progressive step 1 agree."""
    return (seed * 1_000_003 + block * 10_007 + held * 101 + (k or 0)) % (2**63)


def replace_block_(
    student: nn.Module,
    teacher: nn.Module,
    ops: BlockOps,
    index: int,
    kept: int | None,
    config: DCViTConfig,
    inputs: Inputs,
) -> list[int] | None:
    """Replace block `index` of `student` by its compressed (kept units) or dropped (kept=None) form; returns the
    kept original units (None when dropped)."""
    sb, tb = find_backbone(student), find_backbone(teacher)
    block = sb.blocks[index]
    if kept is None:
        sb.blocks[index] = ops.drop(block)
        return None
    held = len(ops.units(block))
    gen = torch.Generator().manual_seed(unit_seed(config.seed, index, held, kept))
    s_stats = t_stats = None
    if config.mlp_init == "gelu_positive":
        s_stats = activation_stats(sb, index, inputs, ops, config.batch_size) if kept <= held else None
        t_stats = activation_stats(tb, index, inputs, ops, config.batch_size) if kept > held else None
    units = select_units(ops, block, kept, config.mlp_init, gen, s_stats, t_stats, ops.hidden(tb.blocks[index]))
    sb.blocks[index] = ops.compress(block, tb.blocks[index], units)
    return units


def rank_blocks(
    teacher: nn.Module,
    ops: BlockOps,
    config: DCViTConfig,
    candidates: list[int],
    kept: int | None,
    train: Inputs,
    metric_set: Inputs,
    metric: str,
    work_dir: str | None = None,
    progress: bool = False,
) -> Ranking:
    """Rank `candidates` (see the module docstring); `kept=None` ranks block dropping (the baseline)."""
    key = {"candidates": candidates, "kept_units": kept, "metric": metric, "config": config.to_dict()}
    done: dict[int, float] = {}
    losses: dict[int, list[float]] = {}
    best: tuple[int, dict[str, torch.Tensor], list[int] | None] | None = None
    path = os.path.join(work_dir, RANKING_NAME) if work_dir else None
    if path and os.path.isfile(path):
        saved = read_json(path)
        if saved.get("key") == key:
            done = {int(k): float(v) for k, v in saved["metrics"].items()}
            if done and os.path.isfile(os.path.join(work_dir, BEST_NAME)):
                b = int(saved["best"])
                best = (b, load_tensors(os.path.join(work_dir, BEST_NAME)), saved.get("best_units"))
    tb = find_backbone(teacher)
    for b in candidates:
        if b in done:
            continue
        student = copy.deepcopy(teacher)
        units = replace_block_(student, teacher, ops, b, kept, config, train)
        sb = find_backbone(student)
        upto = min(b + 1, len(sb.blocks) - 1)
        losses[b] = recover_(
            student, teacher, sb, tb, train, ops, config, upto=upto, epochs=config.ranking_epochs,
            seed=config.seed + b, progress=progress, desc=f"rank block {b}",
        )  # fmt: skip
        done[b] = recoverability(student, teacher, sb, tb, metric_set, metric)
        if best is None or done[b] < done[best[0]] or (done[b] == done[best[0]] and b < best[0]):
            best = (b, {k: v.detach().clone() for k, v in student.state_dict().items()}, units)
            if work_dir:
                save_tensors(os.path.join(work_dir, BEST_NAME), best[1])
        if path:
            record = {"key": key, "metrics": {str(k): v for k, v in done.items()}, "best": best[0]}
            write_json(path, {**record, "best_units": best[2]})
        if progress:
            print(f"[dc_vit] block {b}: recoverability ({metric}) {done[b]:.6g}", flush=True)
        del student
    order = sorted(candidates, key=lambda c: (done[c], c))
    return Ranking(order, done, kept, metric, best[1] if best else None, best[2] if best else None, losses)
