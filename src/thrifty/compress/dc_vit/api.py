"""DC-ViT entry points: `compress_dc_vit_` (one budget, in place) and `compress_dc_vit_family` (a dense family of
budgets, each saved as a model folder), both resumable through a work directory."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from thrifty.compress.dc_vit.block import BlockOps, block_ops
from thrifty.compress.dc_vit.config import DCViTConfig
from thrifty.compress.dc_vit.data import Inputs, collect, to_device
from thrifty.compress.dc_vit.macs import MacProfile
from thrifty.compress.dc_vit.progressive import (
    Step,
    block_units,
    check_plan,
    fresh_student,
    last_finished,
    plan_steps,
    restore_step_,
    run_steps,
)
from thrifty.compress.dc_vit.ranking import Ranking, rank_blocks
from thrifty.compress.dc_vit.recover import describe_recipe, has_head
from thrifty.compress.dc_vit.serialize import MANIFEST, latency_ms, save_dc_vit
from thrifty.compress.dc_vit.structure import (
    Structure,
    block_drop_structure,
    dc_vit_structure,
    default_candidates,
    find_backbone,
    profile_macs,
)
from thrifty.errors import ConfigError


@dataclass
class _Setup:
    ops: BlockOps
    train: Inputs
    metric_set: Inputs
    metric: str
    candidates: list[int]
    profile: MacProfile


def _setup(model: nn.Module, config: DCViTConfig, few_shot: Iterable[Any], metric_batches: Iterable[Any] | None):
    backbone = find_backbone(model)
    ops = block_ops(backbone)
    if any(ops.is_compressed(b) for b in backbone.blocks):
        raise ConfigError("this model already has compressed blocks; compress the original model")
    if config.rank_metric == "kl" and not has_head(model):
        raise ConfigError(
            "rank_metric='kl' compares class logits, but the model has no head (a bare Backbone); pass a "
            "TunedModel with its classifier or rank_metric='mse'"
        )
    split = config.metric_samples if metric_batches is None else 0
    train, rest = collect(few_shot, config.samples, split)
    metric_set = collect(metric_batches, config.metric_samples)[0] if metric_batches is not None else rest
    if metric_set is None:
        raise ConfigError(
            f"no held-apart metric set: pass metric_batches, or few-shot batches holding samples + metric_samples "
            f"= {config.samples + config.metric_samples} samples (the first {config.samples} train, the rest rank)"
        )
    device = next(model.parameters()).device
    candidates = default_candidates(len(backbone.blocks), config.candidates)
    profile = profile_macs(model, config.macs, ops)
    train, metric_set = to_device(train, device), to_device(metric_set, device)
    return _Setup(ops, train, metric_set, config.rank_metric, candidates, profile)


def structure_for(config: DCViTConfig, profile: MacProfile, candidates: list[int], keep: float) -> Structure:
    if config.variant == "block_drop":
        return block_drop_structure(profile, keep, candidates)
    return dc_vit_structure(profile, keep, candidates, config.num_blocks)


def _record(
    model: nn.Module,
    teacher: nn.Module,
    config: DCViTConfig,
    structure: Structure,
    ranking: Ranking,
    profile: MacProfile,
    steps: list[dict[str, Any]],
) -> dict[str, Any]:
    """The compression record of `model` (compression.json without the file-level keys)."""
    ops = block_ops(find_backbone(model))
    blocks = {str(b): u for b, u in block_units(find_backbone(model), ops).items()}
    counted = {conv: profile_macs(model, conv, ops).total for conv in ("torch", "thop")}
    original = {conv: profile_macs(teacher, conv, ops).total for conv in ("torch", "thop")}
    return {
        "config": replace(config, keep_macs=structure.keep).to_dict(),
        "variant": structure.variant,
        "keep_macs": structure.keep,
        "structure": structure.to_dict(),
        "blocks": blocks,
        "removed_attention": sorted(int(b) for b in blocks),
        "kept_mlp_units": {b: (None if u is None else len(u)) for b, u in blocks.items()},
        "macs": {
            "convention": profile.convention,
            "original": profile.total,
            "requested": structure.keep * profile.total,
            "counted": counted[profile.convention],
            "kept_fraction": counted[profile.convention] / profile.total,
            "by_convention": {c: {"original": original[c], "counted": counted[c]} for c in counted},
        },
        "ranking": ranking.to_dict(),
        "recovery": {**describe_recipe(config), "steps": steps},
    }


def compress_dc_vit_(
    model: nn.Module,
    config: DCViTConfig,
    few_shot_batches: Iterable[Any],
    *,
    metric_batches: Iterable[Any] | None = None,
    work_dir: str | None = None,
    progress: bool = False,
    filter_fn: Any = None,
    **kwargs: Any,
) -> None:
    """Compress `model` (a TunedModel or a Backbone) in place to `config.keep_macs` of its MACs; returns None.

    `few_shot_batches`: batches of inputs or (inputs, labels) pairs (labels are dropped unread); the first
    `config.samples` samples train, the next `config.metric_samples` rank blocks unless `metric_batches` is given.
    `work_dir`: checkpoints the ranking and every progressive step; a rerun with the same arguments resumes.
    The record (`model.thrifty_dc_vit`) is what `save_dc_vit` writes to compression.json.
    """
    if filter_fn is not None:
        raise ConfigError("dc_vit rewrites whole blocks; choose them with `candidates`, not filter_fn")
    if kwargs:
        raise ConfigError(f"compress_dc_vit_ got unknown keyword(s) {sorted(kwargs)}")
    s = _setup(model, config, few_shot_batches, metric_batches)
    structure = structure_for(config, s.profile, s.candidates, config.keep_macs)
    teacher = fresh_student(model)
    ranking = rank_blocks(
        teacher, s.ops, config, s.candidates, structure.kept_units, s.train, s.metric_set, s.metric,
        work_dir=work_dir, progress=progress,
    )  # fmt: skip
    steps = plan_steps(ranking.order, [structure])
    if work_dir:
        check_plan(work_dir, _plan(config, [structure], ranking, steps))
    records = run_steps(model, teacher, s.ops, config, steps, ranking, s.train, work_dir=work_dir, progress=progress)
    for p in model.parameters():
        p.requires_grad_(False)
    model.thrifty_dc_vit = _record(model, teacher, config, structure, ranking, s.profile, records)


def _plan(config: DCViTConfig, structures: list[Structure], ranking: Ranking, steps: list[Step]) -> dict[str, Any]:
    return {
        "config": config.to_dict(),
        "budgets": [s.to_dict() for s in structures],
        "order": ranking.order,
        "steps": [st.to_dict() for st in steps],
    }


def compress_dc_vit_family(
    model: nn.Module,
    config: DCViTConfig,
    keeps: Sequence[float],
    few_shot_batches: Iterable[Any],
    output_dir: str,
    *,
    metric_batches: Iterable[Any] | None = None,
    rank_keep: float | None = None,
    latency_batch: int | None = 32,
    backbone: Any = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """A dense family: one compressed model per budget in `keeps`, written to `output_dir/keep_<keep>/`
    (model.safetensors + compression.json), largest budget first, each continuing from the previous one's
    checkpoint (progressive.py) with one shared ranking, computed at the structure of `rank_keep` (default: the
    median budget). `model` is left unchanged. Resumable: rerun the same call after a kill. Returns the records."""
    keeps = sorted({float(k) for k in keeps}, reverse=True)
    if not keeps:
        raise ConfigError("compress_dc_vit_family needs at least one budget in `keeps`")
    s = _setup(model, config, few_shot_batches, metric_batches)
    structures = [structure_for(config, s.profile, s.candidates, k) for k in keeps]  # every budget checked first
    rank_keep = keeps[len(keeps) // 2] if rank_keep is None else float(rank_keep)
    rank_structure = structure_for(config, s.profile, s.candidates, rank_keep)
    work_dir = os.path.join(output_dir, "_work")
    os.makedirs(work_dir, exist_ok=True)
    teacher = fresh_student(model)
    ranking = rank_blocks(
        teacher, s.ops, config, s.candidates, rank_structure.kept_units, s.train, s.metric_set, s.metric,
        work_dir=work_dir, progress=progress,
    )  # fmt: skip
    steps = plan_steps(ranking.order, structures)
    check_plan(work_dir, {**_plan(config, structures, ranking, steps), "rank_keep": rank_keep})
    student = fresh_student(model)
    all_records: list[dict[str, Any]] = []

    def budget_dir(j: int) -> str:
        return os.path.join(output_dir, f"keep_{keeps[j]:.4f}")

    def write(step: Step, record: dict[str, Any], net: nn.Module) -> None:
        for j in step.budgets:
            if os.path.isfile(os.path.join(budget_dir(j), MANIFEST)):
                continue
            cfg = replace(config, keep_macs=keeps[j])
            info = _record(net, teacher, cfg, structures[j], ranking, s.profile, all_records[: step.index + 1])
            if latency_batch:
                info["latency_ms"] = {"batch_size": latency_batch, "median": latency_ms(net, latency_batch)}
            info["family"] = {"keeps": keeps, "index": j, "step": step.index, "rank_keep": rank_keep}
            net.thrifty_dc_vit = info
            save_dc_vit(net, budget_dir(j), backbone=backbone)

    done = last_finished(work_dir, steps)
    for step in steps[: done + 1]:  # budgets whose step finished but whose folder was not written before a kill
        if any(not os.path.isfile(os.path.join(budget_dir(j), MANIFEST)) for j in step.budgets):
            net = fresh_student(model)
            restore_step_(net, work_dir, step.index)
            all_records[:] = _read_records(work_dir, step.index)
            write(step, all_records[-1], net)

    def on_step(step: Step, record: dict[str, Any]) -> None:
        all_records[:] = _read_records(work_dir, step.index)
        write(step, record, student)

    run_steps(student, teacher, s.ops, config, steps, ranking, s.train, work_dir=work_dir, progress=progress,
              on_step=on_step)  # fmt: skip
    from thrifty.io import read_json

    return [read_json(os.path.join(budget_dir(j), MANIFEST)) for j in range(len(keeps))]


def _read_records(work_dir: str, upto: int) -> list[dict[str, Any]]:
    from thrifty.compress.dc_vit.progressive import _step_paths
    from thrifty.io import read_json

    return [read_json(_step_paths(work_dir, i)[1]) for i in range(upto + 1)]
