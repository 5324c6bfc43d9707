"""Stage 3 of DC-ViT (spec §3.2, reference `prune.py`): progressive compression in ranking order.

Start from the recovered student of the best single block (the ranking's), then for each next block: take the
previous student, replace the block, recover, save. A dense family (several budgets, largest first) continues the
same chain: each budget's n blocks all keep its k units (blocks already compressed shrink to k of their units, or
grow with units from the teacher when n rose and k with it), one recovery per added block, or one per budget when
n stays. Every step is checkpointed (`steps/NNNN.safetensors` + `NNNN.json`, the JSON written last) and a killed
run resumes after its last finished step.
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from thrifty.compress.dc_vit.block import BlockOps
from thrifty.compress.dc_vit.config import DCViTConfig
from thrifty.compress.dc_vit.data import Inputs
from thrifty.compress.dc_vit.ranking import Ranking, replace_block_
from thrifty.compress.dc_vit.recover import recover_
from thrifty.compress.dc_vit.structure import Structure, apply_structure_, find_backbone
from thrifty.errors import CheckpointError
from thrifty.io import load_tensors, read_json, save_tensors, write_json


PLAN_NAME = "plan.json"


@dataclass(frozen=True)
class Step:
    """One progressive step: after it, block b holds `target[b]` units (None: dropped); `budgets` are the
    indices of the budgets whose model this step completes."""

    index: int
    target: dict[int, int | None]
    new_block: int | None
    budgets: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target"] = {str(k): v for k, v in self.target.items()}
        d["budgets"] = list(self.budgets)
        return d


def plan_steps(order: list[int], structures: list[Structure]) -> list[Step]:
    """The chain of steps serving `structures` (budgets, largest keep first) in ranking `order`."""
    steps: list[Step] = []
    prev: dict[int, int | None] = {}
    for j, s in enumerate(structures):
        n, k = s.num_blocks, s.kept_units
        first_new = len(prev) if n > len(prev) else n
        for t in range(first_new + 1, n + 1) if n > len(prev) else [n]:
            target = {order[i]: k for i in range(t)}
            if target == prev and steps:
                steps[-1] = Step(steps[-1].index, steps[-1].target, steps[-1].new_block, (*steps[-1].budgets, j))
                continue
            new = order[t - 1] if t > len(prev) else None
            steps.append(Step(len(steps), target, new, (j,) if t == n else ()))
            prev = target
    return steps


def _step_paths(work_dir: str, index: int) -> tuple[str, str]:
    base = os.path.join(work_dir, "steps", f"{index:04d}")
    return base + ".safetensors", base + ".json"


def check_plan(work_dir: str, plan: dict[str, Any]) -> None:
    """Write the plan, or check that `work_dir` holds a run of the same plan (CheckpointError otherwise)."""
    path = os.path.join(work_dir, PLAN_NAME)
    if os.path.isfile(path):
        saved = read_json(path)
        if saved != plan:
            raise CheckpointError(
                f"{work_dir} holds a DC-ViT run with another plan (budgets, ranking or recipe differ); "
                "resume with the same settings or pass a fresh directory"
            )
        return
    write_json(path, plan)


def last_finished(work_dir: str, steps: list[Step]) -> int:
    """Index of the last step whose checkpoint is complete (-1: none)."""
    last = -1
    for step in steps:
        weights, meta = _step_paths(work_dir, step.index)
        if os.path.isfile(meta) and os.path.isfile(weights):
            last = step.index
        else:
            break
    return last


def restore_step_(student: nn.Module, work_dir: str, index: int) -> dict[str, Any]:
    """Rebuild `student`'s structure at step `index` and load its weights; returns the step record."""
    weights, meta = _step_paths(work_dir, index)
    record = read_json(meta)
    blocks = {int(b): units for b, units in record["blocks"].items()}
    backbone = find_backbone(student)
    apply_structure_(backbone, {b: u for b, u in blocks.items()})
    try:
        student.load_state_dict(load_tensors(weights), strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{weights} does not fit the rebuilt student ({exc}); delete {work_dir}") from exc
    return record


def block_units(backbone: nn.Module, ops: BlockOps) -> dict[int, list[int] | None]:
    """Compressed blocks -> kept original units (None: dropped)."""
    from thrifty.compress.dc_vit.block import DroppedBlock

    out: dict[int, list[int] | None] = {}
    for i, b in enumerate(backbone.blocks):
        if isinstance(b, DroppedBlock):
            out[i] = None
        elif ops.is_compressed(b):
            out[i] = ops.units(b)
    return out


def run_steps(
    student: nn.Module,
    teacher: nn.Module,
    ops: BlockOps,
    config: DCViTConfig,
    steps: list[Step],
    ranking: Ranking,
    train: Inputs,
    *,
    work_dir: str | None = None,
    progress: bool = False,
    on_step=None,
) -> list[dict[str, Any]]:
    """Run `steps` on `student` in place (resuming after the last finished step in `work_dir`); `on_step(step,
    record)` is called after each step with the student in that step's state. Returns the step records."""
    sb, tb = find_backbone(student), find_backbone(teacher)
    records: list[dict[str, Any]] = []
    start = 0
    if work_dir:
        done = last_finished(work_dir, steps)
        for i in range(done + 1):
            records.append(read_json(_step_paths(work_dir, i)[1]))
        if done >= 0:
            restore_step_(student, work_dir, done)
            start = done + 1
            if progress:
                print(f"[dc_vit] resuming after step {done} of {len(steps)}", flush=True)
    for step in steps[start:]:
        reuse = (
            step.index == 0
            and ranking.best_state is not None
            and step.target == {ranking.order[0]: ranking.kept_units}
            and config.ranking_epochs == config.epochs
        )
        if reuse:  # the reference starts from the ranking's checkpoint of the best single block
            b = ranking.order[0]
            apply_structure_(sb, {b: ranking.best_units})
            student.load_state_dict(ranking.best_state, strict=True)
            losses: list[float] = []
        else:
            for b, k in step.target.items():
                block = sb.blocks[b]
                if k is None and ops.is_compressed(block) and not ops.units(block):
                    continue
                if k is not None and ops.is_compressed(block) and len(ops.units(block)) == k:
                    continue
                replace_block_(student, teacher, ops, b, k, config, train)
            upto = min(max(step.target) + 1, len(sb.blocks) - 1)
            losses = recover_(
                student, teacher, sb, tb, train, ops, config, upto=upto, epochs=config.epochs,
                seed=config.seed + 7919 * (step.index + 1), progress=progress, desc=f"step {step.index}",
            )  # fmt: skip
        record = {
            "step": step.to_dict(),
            "blocks": {str(b): u for b, u in block_units(sb, ops).items()},
            "reused_ranking_checkpoint": reuse,
            "first_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None,
        }
        if work_dir:
            weights, meta = _step_paths(work_dir, step.index)
            save_tensors(weights, {k: v for k, v in student.state_dict().items()})
            write_json(meta, record)
        records.append(record)
        if progress:
            print(f"[dc_vit] step {step.index}: blocks {record['blocks'] and list(record['blocks'])} "
                  f"final loss {record['final_loss']}", flush=True)  # fmt: skip
        if on_step is not None:
            on_step(step, record)
    return records


def fresh_student(teacher: nn.Module) -> nn.Module:
    student = copy.deepcopy(teacher)
    for p in student.parameters():
        p.requires_grad_(False)
    return student


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
