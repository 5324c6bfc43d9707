"""AdamW (or SGD with momentum 0.9, the long-tail literature's optimizer) with no weight decay on biases and norms;
cosine schedule with linear warm-up (per step). A parameter with an `lr_scale` attribute trains at that multiple of
the scheduled lr (its own group), e.g. MiSLAS's learnable weight scaling at 20x the classifier's lr."""

from __future__ import annotations

import math

import torch
from torch import nn


OPTIMIZERS = ("adamw", "sgd")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weights of rank >= 2 decay; biases, norm scales and 1-d parameters do not (then one group per
    other `lr_scale`)."""
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {(True, 1.0): [], (False, 1.0): []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not (p.ndim < 2 or name.endswith(".bias") or "norm" in name.lower())
        groups.setdefault((decay, float(getattr(p, "lr_scale", 1.0))), []).append(p)
    out = []
    for (decay, scale), params in groups.items():
        if params:
            g = {"params": params, "weight_decay": weight_decay if decay else 0.0}
            out.append(g if scale == 1.0 else {**g, "lr_scale": scale})
    return out


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, kind: str = "adamw") -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(param_groups(model, weight_decay), lr=lr, momentum=0.9)
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.999))


def cosine_lr(step: int, total_steps: int, base_lr: float, warmup_steps: int, min_lr: float) -> float:
    """Linear warm-up from base_lr/warmup to base_lr over `warmup_steps`, then cosine decay to `min_lr`."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
