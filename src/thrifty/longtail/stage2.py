"""Classifier re-training on class-balanced batches: cRT (Kang et al. 2020) and MiSLAS stage 2 (BTM's stage 2).

Only the head trains (the backbone's parameters are frozen, so its features are detached); the batches come from
the class-balanced sampler. Options:
- `reinit`: start from a fresh head (cRT) or from the trained one (MiSLAS);
- `shift_bn`: BatchNorm in train mode, its running statistics re-estimated on the balanced batches (MiSLAS
  "shift BN"; only for methods that train BatchNorm statistics, i.e. `full`);
- `criterion`: ce (cRT), las (MiSLAS label-aware smoothing, `smooth_head`/`smooth_tail`), gml (BTM's GML option);
- `lws`: MiSLAS learnable weight scaling, logits * s_c with s (1, C) at `lws_lr_scale` x the head's lr (MiSLAS: head
  lr x0.05, LWS x1.0 -> 20); after training s is folded into the head (W <- diag(s) W, b <- s * b), so the saved
  head is a plain Linear and inference costs nothing extra.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from thrifty.data import TaskData
from thrifty.errors import ConfigError
from thrifty.objectives import LongTailObjective
from thrifty.runtime import resolve_device
from thrifty.train import TrainConfig, Trainer
from thrifty.train.run import finish_run
from thrifty.train.trainer import Member
from thrifty.tuners import TunedModel


@dataclass
class Stage2Config:
    criterion: str = "las"
    smooth_head: float = 0.3  # MiSLAS ImageNet-LT / iNat settings (Places: 0.4 / 0.1)
    smooth_tail: float = 0.0
    reinit: bool = False
    shift_bn: bool = True
    lws: bool = True
    lws_lr_scale: float = 20.0

    def __post_init__(self) -> None:
        if self.criterion not in ("ce", "las", "gml"):
            raise ConfigError(f"stage-2 criterion must be ce, las or gml, got {self.criterion!r}")
        if self.lws_lr_scale <= 0:
            raise ConfigError(f"lws_lr_scale must be positive, got {self.lws_lr_scale}")

    @classmethod
    def crt(cls) -> Stage2Config:
        """cRT: a fresh head, CE, BatchNorm statistics kept, no weight scaling."""
        return cls(criterion="ce", reinit=True, shift_bn=False, lws=False)

    def objective(self, class_counts: list[int], thresholds: dict[str, Any] | None = None) -> LongTailObjective:
        return LongTailObjective(
            criterion=self.criterion,
            smooth_head=self.smooth_head,
            smooth_tail=self.smooth_tail,
            balance="class",
            class_counts=list(class_counts),
            **(thresholds or {}),
        )


class LWSHead(nn.Module):
    """logits = linear(x) * scale, scale (1, C) initialised to ones (MiSLAS `LearnableWeightScaling`)."""

    def __init__(self, linear: nn.Linear, lr_scale: float):
        super().__init__()
        self.linear = linear
        self.scale = nn.Parameter(torch.ones(1, linear.out_features, device=linear.weight.device))
        self.scale.lr_scale = lr_scale  # read by thrifty.train.optim.param_groups

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * self.scale

    @torch.no_grad()
    def folded(self) -> nn.Linear:
        """The Linear with the scale folded in: exactly linear(x) * scale."""
        s = self.scale.reshape(-1, 1)
        self.linear.weight.mul_(s)
        if self.linear.bias is not None:
            self.linear.bias.mul_(s.reshape(-1))
        return self.linear


def reset_head_(head: nn.Module) -> None:
    """A fresh Linear head (torch's init, zero bias: what objectives' build_head gives)."""
    if not isinstance(head, nn.Linear):
        raise ConfigError("classifier re-training needs a Linear head")
    head.reset_parameters()
    nn.init.zeros_(head.bias)


@contextlib.contextmanager
def head_only(model: nn.Module, config: Stage2Config):
    """Inside: only `model.head` (+ LWS scale) trains; BatchNorm follows `shift_bn`. On exit the LWS scale is folded,
    the method's trainable set and BatchNorm mode are restored (so saving writes the whole recipe again)."""
    if not isinstance(model.head, nn.Linear):
        raise ConfigError("classifier re-training needs a Linear head (classification-style objectives)")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    bn_before = getattr(model.config, "bn_stats", None)
    if config.reinit:
        reset_head_(model.head)
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("head."))
    if bn_before is not None:
        model.config.bn_stats = "update" if config.shift_bn else "frozen"
    if config.lws:
        model.head = LWSHead(model.head, config.lws_lr_scale)
    try:
        yield model
    finally:
        if isinstance(model.head, LWSHead):
            model.head = model.head.folded()
        for n, p in model.named_parameters():
            p.requires_grad_(n in trainable)
        if bn_before is not None:
            model.config.bn_stats = bn_before


def retrain_classifier(
    model: TunedModel,
    task: TaskData,
    train: TrainConfig,
    config: Stage2Config,
    class_counts: list[int],
    output_dir: str | None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Stage 2 / cRT (thrifty.longtail.stage2) with the one Trainer; resumes its checkpoint; saves the model."""
    lt = task.meta.get("long_tail") or {}
    thresholds = {k: lt[k] for k in ("many_threshold", "few_threshold") if k in lt}
    obj = config.objective(class_counts, thresholds)
    with head_only(model, config):
        fit = Trainer(model, task, train, output_dir, objective=obj, data_parallel=False).fit(resume=True)
    return finish_run(
        Member(model, train, output_dir=output_dir),
        task,
        obj,
        fit,
        {},
        resolve_device(train.device),
        False,
        {**(extra or {}), "stage2": asdict(config)},
    )
