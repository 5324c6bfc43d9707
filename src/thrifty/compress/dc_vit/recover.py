"""Recovery (spec §3.2, reference `end_to_end_finetune` with FT='MiR', update_setting='before').

    L = MSE( f_S(x), f_T(x) )      f = all tokens after the final norm (B, N, D); padding tokens excluded

scaled by min(epoch / warmup_epochs, 1); AdamW(lr, weight_decay) over the trainable parameters, cosine over the
epochs (one scheduler step per epoch). Trainable: the embeddings, blocks 0 .. `upto` (the block after the last
compressed one) and, as in the reference, the final norm; later blocks and the head stay frozen. The student runs in
eval mode (the reference sets dropout and drop-path to 0). Labels are never read: the inputs carry none.

The recoverability metric (reference `metric`, KLLoss): sum-KL(softmax(z_T) || softmax(z_S)) / batch, averaged over
the metric set; `mse` compares final-norm tokens instead (models without a classifier head).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from thrifty.compress.dc_vit.block import BlockOps
from thrifty.compress.dc_vit.config import DCViTConfig
from thrifty.compress.dc_vit.data import Inputs, batches_of, flip, num_samples, take
from thrifty.errors import ConfigError, NonFiniteLossError


def final_tokens(backbone: nn.Module, x: Inputs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, N, D) tokens after the final norm (`forward_features` before pooling) and the (B, N) real-token mask."""
    h, ctx = backbone.embed(x)
    for i in range(len(backbone.blocks)):
        h = backbone.run_block(i, h, ctx)
    return backbone.norm(h), backbone.token_mask(ctx, h)


def token_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error over every element of the real tokens (torch's MSELoss(reduction='mean') for images)."""
    if mask is None:
        return F.mse_loss(student, teacher)
    m = mask.to(student.dtype).unsqueeze(-1)
    return ((student - teacher) ** 2 * m).sum() / (m.sum() * student.shape[-1]).clamp_min(1.0)


def set_trainable_(model: nn.Module, backbone: nn.Module, ops: BlockOps, upto: int, train_norm: bool) -> list:
    """Freeze everything, then unfreeze the embeddings, blocks 0..upto and (train_norm) the final norm."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = ops.prefix_parameters(backbone, train_norm)
    for i in range(min(upto, len(backbone.blocks) - 1) + 1):
        params += list(backbone.blocks[i].parameters())
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            p.requires_grad_(True)
            out.append(p)
    return out


def recover_(
    student: nn.Module,
    teacher: nn.Module,
    student_backbone: nn.Module,
    teacher_backbone: nn.Module,
    inputs: Inputs,
    ops: BlockOps,
    config: DCViTConfig,
    *,
    upto: int,
    epochs: int,
    seed: int,
    progress: bool = False,
    desc: str = "recover",
) -> list[float]:
    """Recover `student` in place against `teacher` on `inputs`; returns the (unscaled) loss of every epoch."""
    losses: list[float] = []
    if epochs <= 0:
        return losses
    params = set_trainable_(student, student_backbone, ops, upto, config.train_norm)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    gen = torch.Generator().manual_seed(seed)
    n = num_samples(inputs)
    cached = None
    if config.augment == "none":
        with torch.no_grad():
            cached = [final_tokens(teacher_backbone, b)[0] for b in batches_of(inputs, config.batch_size)]
            cached = torch.cat(cached)
    student.eval()
    teacher.eval()
    bar = tqdm(range(epochs), desc=desc, disable=not progress, leave=False)
    try:
        for epoch in bar:
            order = torch.randperm(n, generator=gen)
            total, seen = 0.0, 0
            for start in range(0, n, config.batch_size):
                idx = order[start : start + config.batch_size]
                x = take(inputs, idx)
                if config.augment == "flip":
                    x = flip(x, gen)
                if cached is not None:
                    target = cached[idx]
                else:
                    with torch.no_grad():
                        target = final_tokens(teacher_backbone, x)[0]
                tokens, mask = final_tokens(student_backbone, x)
                loss = token_mse(tokens, target, mask)
                if not math.isfinite(float(loss.detach())):
                    raise NonFiniteLossError(f"{desc}: recovery loss {float(loss)} at epoch {epoch}; lower `lr`")
                scale = min(epoch / config.warmup_epochs, 1.0) if config.warmup_epochs else 1.0
                optimizer.zero_grad(set_to_none=True)
                (loss * scale).backward()
                optimizer.step()
                total += float(loss.detach()) * len(idx)
                seen += len(idx)
            scheduler.step()
            losses.append(total / seen)
            bar.set_postfix(loss=f"{losses[-1]:.4g}")
    finally:
        optimizer.zero_grad(set_to_none=True)
        for p in student.parameters():
            p.requires_grad_(False)
    return losses


@torch.no_grad()
def recoverability(
    student: nn.Module,
    teacher: nn.Module,
    student_backbone: nn.Module,
    teacher_backbone: nn.Module,
    inputs: Inputs,
    metric: str,
    batch_size: int = 128,
) -> float:
    """Mean over `inputs` of the reference's KLLoss (teacher vs student logits) or of the token MSE (`mse`)."""
    student.eval()
    teacher.eval()
    total, n = 0.0, 0
    for x in batches_of(inputs, batch_size):
        b = num_samples(x)
        if metric == "kl":
            zs, zt = student(x), teacher(x)
            if zs.ndim != 2 or zs.shape[-1] < 2:
                raise ConfigError("rank_metric='kl' needs class logits (a model with a head); use rank_metric='mse'")
            total += float(F.kl_div(F.log_softmax(zs, 1), F.softmax(zt, 1), reduction="sum"))
        else:
            s, mask = final_tokens(student_backbone, x)
            t, _ = final_tokens(teacher_backbone, x)
            total += float(token_mse(s, t, mask)) * b
        n += b
    return total / n


def has_head(model: nn.Module) -> bool:
    """True when `model(x)` gives logits (a TunedModel with a classifier head), not pooled features."""
    from thrifty.backbones import Backbone

    return not isinstance(model, Backbone) and isinstance(getattr(model, "head", None), nn.Module)


def describe_recipe(config: DCViTConfig) -> dict[str, Any]:
    return {
        "loss": "MSE on final-norm tokens vs the teacher (labels unused)",
        "optimizer": "AdamW",
        "lr": config.lr,
        "weight_decay": config.weight_decay,
        "schedule": "cosine over epochs, loss x min(epoch / warmup_epochs, 1)",
        "epochs": config.epochs,
        "rank_epochs": config.ranking_epochs,
        "warmup_epochs": config.warmup_epochs,
        "batch_size": config.batch_size,
        "samples": config.samples,
        "augment": config.augment,
        "trainable": "embeddings, blocks up to the one after the last compressed block"
        + (", final norm" if config.train_norm else ""),
    }
