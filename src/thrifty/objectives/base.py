"""`Objective`: what a task optimises and reports. It owns the head, the loss, the metrics (their names and how
they accumulate over a split), the default batch sampler and the metric that selects a checkpoint on val.
Methods produce features (or, for a language model, the model's own logits); the objective turns them into a
loss and numbers, so the one Trainer serves every task.

    head = objective.build_head(backbone, num_outputs)            # e.g. Linear(D, C); an LM's own head
    loss = objective.loss(model(x), objective.targets(x, y))      # a scalar to minimise
    meter = objective.meter(); meter.update(outputs, targets) ... meter.compute() -> {"accuracy": ..., ...}
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import Sampler

from thrifty.errors import ConfigError


class Meter:
    """Accumulates one split's outputs batch by batch; `compute()` gives the objective's metrics."""

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        raise NotImplementedError


@dataclass
class Objective:
    """Base of every objective; subclasses are dataclasses whose fields are the objective's options."""

    name: ClassVar[str] = ""
    metric_names: ClassVar[tuple[str, ...]] = ()  # keys of `meter().compute()` (results.json: test_<name>)
    selection_metric: ClassVar[str] = "loss"  # picks the epoch / sweep member on val
    greater_is_better: ClassVar[bool] = False
    percent: ClassVar[bool] = True  # the headline metric lies in [0, 1] and is shown in %
    needs_classes: ClassVar[bool] = True  # the task has integer class labels in [0, num_classes)

    # --- model ---------------------------------------------------------------------------------------------
    def num_outputs(self, num_classes: int | None) -> int | None:
        """Width of the head for a task with `num_classes` classes."""
        return num_classes

    def build_head(self, backbone: nn.Module, num_outputs: int | None) -> nn.Module:
        """A fresh head on the backbone's pooled features (B, D) -> (B, num_outputs); zero bias."""
        if num_outputs is None:
            raise ConfigError(f"objective {self.name!r} needs the number of outputs (classes) of the task")
        head = nn.Linear(int(backbone.num_features), int(num_outputs))
        nn.init.zeros_(head.bias)
        return head

    # --- training ------------------------------------------------------------------------------------------
    def targets(self, inputs: Any, labels: torch.Tensor) -> torch.Tensor:
        """What the loss compares the outputs with (the labels, unless the objective derives them from inputs)."""
        return labels

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        raise NotImplementedError

    def meter(self) -> Meter:
        raise NotImplementedError

    def sampler(
        self, labels: Any, batch_size: int, seed: int, *, rank: int = 0, world_size: int = 1
    ) -> Sampler[list[int]]:
        """The training batches: seeded, shuffled, identical whether 1 or N data-parallel processes train."""
        from thrifty.data.sampler import GlobalBatchSampler

        return GlobalBatchSampler(len(labels), batch_size, seed, rank=rank, world_size=world_size)

    def fit_data(self, labels: Any, num_classes: int | None, meta: dict[str, Any] | None = None) -> None:
        """Called by the Trainer with the labels of the split that trains, before the sampler is built: objectives
        that depend on the training distribution (long_tail: class counts) read it here. Default: nothing."""

    def training_batch(self, inputs: Any, targets: torch.Tensor, seed: tuple[int, ...]) -> tuple[Any, Any]:
        """A training batch as the loss sees it (e.g. mixup: mixed inputs, soft targets), seeded by
        (seed, epoch, step) so a resumed run draws the same. Default: unchanged."""
        return inputs, targets

    def check_task(self, num_classes: int | None) -> None:
        """Raise ConfigError when a task cannot be trained with this objective."""
        if self.needs_classes and not num_classes:
            raise ConfigError(f"objective {self.name!r} needs a task with class labels")

    def check_train(self, label_smoothing: float) -> None:
        if label_smoothing:
            raise ConfigError(f"`label_smoothing` applies to classification, not to objective {self.name!r}")

    # --- selection -----------------------------------------------------------------------------------------
    def better(self, value: float, best: float | None) -> bool:
        """Whether `value` of the selection metric beats `best` (None: nothing yet)."""
        if best is None:
            return True
        return value > best if self.greater_is_better else value < best

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            **dataclasses.asdict(self),
            "metrics": list(self.metric_names),
            "selection_metric": self.selection_metric,
            "greater_is_better": self.greater_is_better,
            "percent": self.percent,
        }

    @classmethod
    def from_overrides(cls, overrides: dict[str, Any]) -> Objective:
        """Options from `--set`-style strings, coerced to the field types."""
        from thrifty.values import coerce

        fields = {f.name for f in dataclasses.fields(cls) if f.init}
        hints = typing.get_type_hints(cls)
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ConfigError(f"objective {cls.name!r} has no option {unknown[0]!r}; options: {sorted(fields)}")
        return cls(**{k: coerce(v, hints[k], k) for k, v in overrides.items()})
