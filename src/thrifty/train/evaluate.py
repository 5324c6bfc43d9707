"""Evaluation of one or several models on a split, with the objective's meters (accuracy, AUC, perplexity...)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import BatchSampler, SequentialSampler
from tqdm.auto import tqdm

from thrifty.data.base import LabelledDataset, batch_loader
from thrifty.objectives import Objective, make_objective
from thrifty.runtime import autocast, to_device


def objective_of(model: nn.Module, objective: Objective | str | None = None) -> Objective:
    """`objective` if given, else the one the model was built for (TunedModel.objective), else classification."""
    return make_objective(objective if objective is not None else getattr(model, "objective", None))


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: LabelledDataset,
    batch_size: int = 64,
    device: torch.device | None = None,
    amp: bool = False,
    progress: bool = False,
    desc: str = "eval",
    *,
    objective: Objective | str | None = None,
) -> dict[str, float]:
    """The objective's metrics of `model` on `dataset` (classification: accuracy, loss, samples)."""
    obj = objective_of(model, objective)
    return evaluate_many({"model": model}, dataset, obj, batch_size, device, amp, progress, desc)["model"]


@torch.no_grad()
def evaluate_many(
    models: dict[str, nn.Module],
    dataset: LabelledDataset,
    objective: Objective,
    batch_size: int = 64,
    device: torch.device | None = None,
    amp: bool = False,
    progress: bool = False,
    desc: str = "eval",
    prepare: Callable[[Any], Any] | None = None,
    forward: Callable[[nn.Module, Any], torch.Tensor] | None = None,
) -> dict[str, dict[str, float]]:
    """`evaluate` for several models in one pass over `dataset`: `prepare(inputs)` runs once per batch (e.g. a
    frozen backbone shared by side networks), then `forward(model, prepared)` (default `model(prepared)`) each."""
    device = device or next(next(iter(models.values())).parameters()).device
    was_training = {k: m.training for k, m in models.items()}
    for m in models.values():
        m.eval()
    loader = batch_loader(dataset, BatchSampler(SequentialSampler(range(len(dataset))), batch_size, drop_last=False))
    meters = {k: objective.meter() for k in models}
    for inputs, labels in tqdm(loader, desc=desc, disable=not progress, leave=False):
        inputs, labels = to_device(inputs, device), labels.to(device)
        targets = objective.targets(inputs, labels)
        with autocast(device, amp):
            shared = prepare(inputs) if prepare is not None else inputs
            outs = {k: forward(m, shared) if forward is not None else m(shared) for k, m in models.items()}
        for k, out in outs.items():
            meters[k].update(out.float(), targets)
    for k, m in models.items():
        m.train(was_training[k])
    return {k: meter.compute() for k, meter in meters.items()}
