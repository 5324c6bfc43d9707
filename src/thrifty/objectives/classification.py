"""`classification`: single-label multi-class, cross-entropy, top-1 accuracy (the first half's behaviour)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from thrifty.objectives.base import Meter, Objective


class AccuracyMeter(Meter):
    """Top-1 accuracy and mean cross-entropy over the samples seen."""

    def __init__(self) -> None:
        self.correct, self.loss_sum, self.samples = 0, 0.0, 0

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        logits = outputs.float()  # (B, C)
        self.correct += int((logits.argmax(-1) == targets).sum())
        self.loss_sum += float(nn.functional.cross_entropy(logits, targets, reduction="sum"))
        self.samples += len(targets)

    def compute(self) -> dict[str, float]:
        n = max(1, self.samples)
        return {"accuracy": self.correct / n, "loss": self.loss_sum / n, "samples": self.samples}


@dataclass
class ClassificationObjective(Objective):
    """logits = head(features), (B, C); loss = CE(logits, y) (label smoothing from the training recipe)."""

    name: ClassVar[str] = "classification"
    metric_names: ClassVar[tuple[str, ...]] = ("accuracy", "loss")
    selection_metric: ClassVar[str] = "accuracy"
    greater_is_better: ClassVar[bool] = True

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        return nn.functional.cross_entropy(outputs.float(), targets, label_smoothing=label_smoothing)

    def meter(self) -> Meter:
        return AccuracyMeter()

    def check_train(self, label_smoothing: float) -> None:
        """Any label smoothing in [0, 1) is valid here."""
