"""`binary`: one logit per sample, binary cross-entropy; ROC AUC and log loss (click-through-rate style tasks).

AUC is computed exactly as the Mann-Whitney statistic with average ranks for ties (equal to scikit-learn's
`roc_auc_score`); log loss is the mean BCE computed from the logits (softplus form, no clipping: equal to
scikit-learn's `log_loss` on sigmoid probabilities wherever those are not clipped at float eps).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from thrifty.errors import ConfigError
from thrifty.objectives.base import Meter, Objective


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: (sum of positive ranks - P(P+1)/2) / (P N), ranks averaged over ties."""
    from scipy.stats import rankdata

    labels = np.asarray(labels).astype(bool)
    pos, neg = int(labels.sum()), int((~labels).sum())
    if pos == 0 or neg == 0:
        return float("nan")  # undefined with one class (scikit-learn raises; a split may legitimately lack one)
    ranks = rankdata(np.asarray(scores, dtype=np.float64), method="average")
    return float((ranks[labels].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def _logits(outputs: torch.Tensor) -> torch.Tensor:
    """(B, 1) or (B,) -> (B,) float32 logits."""
    return outputs.float().reshape(outputs.shape[0])


class BinaryMeter(Meter):
    """Keeps every score (float64) for the exact AUC; sums the BCE for log loss; counts correct at p = 0.5."""

    def __init__(self) -> None:
        self.scores: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.loss_sum, self.correct, self.samples = 0.0, 0, 0

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        z, y = _logits(outputs), targets.float()
        self.loss_sum += float(nn.functional.binary_cross_entropy_with_logits(z, y, reduction="sum"))
        self.correct += int(((z > 0).float() == y).sum())
        self.samples += len(y)
        self.scores.append(z.detach().double().cpu().numpy())
        self.labels.append(targets.detach().cpu().numpy())

    def compute(self) -> dict[str, float]:
        n = max(1, self.samples)
        scores = np.concatenate(self.scores) if self.scores else np.zeros(0)
        labels = np.concatenate(self.labels) if self.labels else np.zeros(0)
        return {
            "auc": roc_auc(scores, labels),
            "logloss": self.loss_sum / n,
            "accuracy": self.correct / n,
            "loss": self.loss_sum / n,
            "samples": self.samples,
        }


@dataclass
class BinaryObjective(Objective):
    """logit = head(features), (B, 1); loss = BCE-with-logits(logit, y), y in {0, 1}; `pos_weight` scales the
    positive term (torch's BCEWithLogitsLoss) for skewed click rates."""

    name: ClassVar[str] = "binary"
    metric_names: ClassVar[tuple[str, ...]] = ("auc", "logloss", "accuracy", "loss")
    selection_metric: ClassVar[str] = "auc"
    greater_is_better: ClassVar[bool] = True

    pos_weight: float | None = None

    def num_outputs(self, num_classes: int | None) -> int:
        # 2: a task's class count; 1: the head width a saved binary model records (TunedModel.num_classes)
        if num_classes not in (1, 2):
            raise ConfigError(f"objective 'binary' needs a task with 2 classes (labels 0/1), got {num_classes}")
        return 1

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        z = _logits(outputs)
        weight = None if self.pos_weight is None else torch.tensor(self.pos_weight, device=z.device)
        return nn.functional.binary_cross_entropy_with_logits(z, targets.float(), pos_weight=weight)

    def meter(self) -> Meter:
        return BinaryMeter()
