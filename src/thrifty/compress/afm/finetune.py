"""Optional training after factorization (the paper's schedule is NOT FOUND; the choice here, docs/methods.md):

- `labels`: the model's own objective (TunedModel.objective: BCE for CTR, cross-entropy for classifiers) on the
  proxy batches' labels;
- `mimic`: MSE between the compressed and the original model's features (TunedModel.features, else the output),
  no labels: global feature mimicking;
AdamW (no weight decay), every parameter trains, `finetune_epochs` passes over the proxy batches in a seeded
shuffled order, cosine learning rate from `finetune_lr` to 1 % of it, gradient norm clipped at 1. Under torchrun
the gradients are averaged over the ranks (each rank holds its shard of the proxy set).
`init="scratch"` first re-draws every weight (`reinit_`) and then trains with `labels`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from thrifty.backbones.ctr import FactorizedEmbedding
from thrifty.compress.afm.stats import distributed
from thrifty.compress.calibration import batch_inputs
from thrifty.errors import ConfigError
from thrifty.runtime import to_device


@torch.no_grad()
def reinit_(root: nn.Module, seed: int = 0) -> None:
    """Every weight re-drawn as at construction: Linear / norm layers by their `reset_parameters`, embedding
    tables N(0, 1e-4) (the CTR backbones' init), heads with zero bias; other parameters zero."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        seen: set[int] = set()
        for m in root.modules():
            if isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, 0.0, 1e-4)
            elif hasattr(m, "reset_parameters") and not isinstance(m, FactorizedEmbedding):
                m.reset_parameters()
            else:
                continue
            seen.update(id(p) for p in m.parameters(recurse=False))
        head = getattr(root, "head", None)
        if isinstance(head, nn.Linear) and head.bias is not None:
            nn.init.zeros_(head.bias)
        for p in root.parameters():
            if id(p) not in seen:
                p.zero_()


def _features(model: nn.Module, x: Any) -> torch.Tensor:
    return model.features(x) if hasattr(model, "features") and hasattr(model, "head") else model(x)


def finetune_(root: nn.Module, config: Any, batches: list[Any], teacher: nn.Module | None = None) -> None:
    """Train `root` in place on the proxy batches (see module docstring)."""
    from thrifty.objectives import make_objective

    if config.finetune == "labels":
        if not all(isinstance(b, (tuple, list)) and len(b) >= 2 for b in batches):
            raise ConfigError("finetune='labels' needs (inputs, labels) batches; use finetune='mimic' without labels")
        objective = make_objective(getattr(root, "objective", None))
    elif teacher is None:
        raise ConfigError("finetune='mimic' needs the original model: prepare with this config (it keeps a copy)")
    device = next(root.parameters()).device
    params = [p for p in root.parameters() if p.is_floating_point()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=config.finetune_lr, weight_decay=0.0)
    total = config.finetune_epochs * len(batches)
    world = torch.distributed.get_world_size() if distributed() else 1
    step = 0
    gen = torch.Generator().manual_seed(0)
    root.train()
    bar = tqdm(total=total, desc=f"afm fine-tune ({config.finetune})", leave=False, mininterval=5.0)
    for _ in range(config.finetune_epochs):
        for i in torch.randperm(len(batches), generator=gen).tolist():
            batch = batches[i]
            x = to_device(batch_inputs(batch), device)
            if config.finetune == "labels":
                y = batch[1].to(device)
                loss = objective.loss(root(x), objective.targets(x, y))
            else:
                with torch.no_grad():
                    want = _features(teacher, x)
                loss = nn.functional.mse_loss(_features(root, x), want)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if world > 1:
                for p in params:
                    if p.grad is not None:
                        torch.distributed.all_reduce(p.grad)
                        p.grad.div_(world)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            for g in opt.param_groups:
                g["lr"] = config.finetune_lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * step / max(1, total))))
            opt.step()
            step += 1
            bar.update(1)
            if not math.isfinite(loss.item()):
                raise ConfigError(f"afm fine-tune diverged (loss {loss.item()}); lower finetune_lr")
    bar.close()
    root.eval()
