"""`long_tail`: classification on long-tailed training data, reported on a balanced test split with the metrics of
BTM's code (longtail-ssl.md §1.1) and the many / medium / few accuracies (§6).

Per-class recall a_c = correct_c / n_c^test (classes absent from the split are left out), then

    mean_class_accuracy = (1/C) sum_c a_c                 (= top-1 on a balanced test set)
    hmean = C / sum_c 1/a'_c,  gmean = (prod_c a'_c)^(1/C),  a'_c = a_c with 0 replaced by 1e-3
            (BTM train_stage1_bl_10_classifier.py: `acc_classes[acc_classes == 0] = 1e-3`; scipy hmean/gmean)
    worst_class_accuracy = min_c a_c
    many / medium / few_accuracy = mean of a_c over the classes with training count n_c > 100 / 20..100 / < 20
            (BALMS `shot_acc`; thresholds configurable; None when a group has no class)

plus `accuracy` (top-1 over samples), `loss` (mean CE), `samples` and `per_class_accuracy` (a list, None for a
class without test samples). Values are fractions in [0, 1].

Options (`--objective long_tail:criterion=cb,mixup=0.2`): `criterion` ce | cb | logit_adjust | las | gml
(thrifty.objectives.lt_losses), `beta` (cb), `tau` (logit_adjust; 1 = Balanced Softmax), `smooth_head`,
`smooth_tail`, `smooth_shape` (las), `gml_p`, `balance` instance | class (the training sampler: shuffled, or
class-balanced thrifty.data.balanced_sampler), `epoch_length` data | max (class-balanced epochs), `mixup` (Beta
alpha; 0 = off), `many_threshold` / `few_threshold` (default: the data's, else 100 / 20), `class_counts` (fixed
training counts; default: counted on the split that trains, `fit_data`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from thrifty.errors import ConfigError
from thrifty.objectives import lt_losses as L
from thrifty.objectives.base import Meter
from thrifty.objectives.classification import ClassificationObjective


CRITERIA = ("ce", "cb", "logit_adjust", "las", "gml")
BALANCE = ("instance", "class")
FLOOR = 1e-3  # BTM's floor of a zero per-class accuracy before hmean / gmean


def long_tail_metrics(
    correct: np.ndarray,
    total: np.ndarray,
    train_counts: np.ndarray | None = None,
    many: int = 100,
    few: int = 20,
    floor: float = FLOOR,
) -> dict[str, Any]:
    """The metrics of the module docstring from per-class correct / total counts on the evaluated split."""
    correct, total = np.asarray(correct, np.float64), np.asarray(total, np.float64)
    seen = total > 0
    acc = np.where(seen, correct / np.maximum(total, 1), np.nan)
    a = acc[seen]
    out: dict[str, Any] = {"per_class_accuracy": [None if np.isnan(v) else float(v) for v in acc]}
    if not len(a):
        return {**out, "mean_class_accuracy": None, "hmean": None, "gmean": None, "worst_class_accuracy": None}
    floored = np.where(a == 0, floor, a)
    out.update(
        mean_class_accuracy=float(a.mean()),
        hmean=float(len(floored) / np.sum(1.0 / floored)),
        gmean=float(np.exp(np.mean(np.log(floored)))),
        worst_class_accuracy=float(a.min()),
    )
    counts = None if train_counts is None else np.asarray(train_counts)
    for group in ("many", "medium", "few"):
        if counts is None or len(counts) != len(acc):
            out[f"{group}_accuracy"] = None
            continue
        mask = {"many": counts > many, "medium": (counts <= many) & (counts >= few), "few": counts < few}[group]
        vals = acc[mask & seen]
        out[f"{group}_accuracy"] = float(vals.mean()) if len(vals) else None
    return out


class LongTailMeter(Meter):
    """Per-class correct / total counts, top-1 and CE over a split; `compute()` -> `long_tail_metrics` + more."""

    def __init__(self, train_counts: np.ndarray | None, many: int, few: int, floor: float = FLOOR):
        self.train_counts, self.many, self.few, self.floor = train_counts, many, few, floor
        self.correct: np.ndarray | None = None
        self.total: np.ndarray | None = None
        self.loss_sum, self.samples = 0.0, 0

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        logits = outputs.float()  # (B, C)
        c = logits.shape[-1]
        if self.correct is None:
            self.correct, self.total = np.zeros(c, np.int64), np.zeros(c, np.int64)
        hit = (logits.argmax(-1) == targets).long()
        self.correct += np.bincount(targets.cpu().numpy(), weights=hit.cpu().numpy(), minlength=c).astype(np.int64)
        self.total += np.bincount(targets.cpu().numpy(), minlength=c)
        self.loss_sum += float(nn.functional.cross_entropy(logits, targets, reduction="sum"))
        self.samples += len(targets)

    def compute(self) -> dict[str, Any]:
        n = max(1, self.samples)
        if self.correct is None:
            return {"accuracy": 0.0, "loss": 0.0, "samples": 0, **long_tail_metrics(np.zeros(0), np.zeros(0))}
        out = long_tail_metrics(self.correct, self.total, self.train_counts, self.many, self.few, self.floor)
        return {**out, "accuracy": float(self.correct.sum() / n), "loss": self.loss_sum / n, "samples": self.samples}


@dataclass
class LongTailObjective(ClassificationObjective):
    """Linear head, a long-tail criterion and sampler (module docstring); selects on mean per-class accuracy."""

    name: ClassVar[str] = "long_tail"
    metric_names: ClassVar[tuple[str, ...]] = (
        "mean_class_accuracy",
        "hmean",
        "gmean",
        "worst_class_accuracy",
        "many_accuracy",
        "medium_accuracy",
        "few_accuracy",
        "accuracy",
        "loss",
    )
    selection_metric: ClassVar[str] = "mean_class_accuracy"
    greater_is_better: ClassVar[bool] = True

    criterion: str = "ce"
    beta: float = 0.9999
    tau: float = 1.0
    smooth_head: float = 0.3
    smooth_tail: float = 0.0
    smooth_shape: str = "concave"
    gml_p: float = 1.0
    balance: str = "instance"
    epoch_length: str = "data"
    mixup: float = 0.0
    many_threshold: int | None = None
    few_threshold: int | None = None
    class_counts: list[int] | None = None
    train_counts: list[int] | None = field(default=None, init=False)  # counted by fit_data (recorded in results)

    def __post_init__(self) -> None:
        if self.criterion not in CRITERIA:
            raise ConfigError(f"long_tail criterion must be one of {', '.join(CRITERIA)}, got {self.criterion!r}")
        if self.balance not in BALANCE:
            raise ConfigError(f"long_tail balance must be 'instance' or 'class', got {self.balance!r}")
        if not 0.0 <= self.beta < 1.0:
            raise ConfigError(f"long_tail beta must be in [0, 1), got {self.beta}")
        if self.mixup < 0:
            raise ConfigError(f"long_tail mixup (Beta alpha) must be >= 0, got {self.mixup}")
        if self.criterion == "gml" and self.mixup:
            raise ConfigError("the GML criterion needs hard labels; set mixup=0")
        if self.gml_p <= 0:
            raise ConfigError(f"gml_p must be positive, got {self.gml_p}")
        L.las_epsilon(np.ones(2), self.smooth_head, self.smooth_tail, self.smooth_shape)  # validates the shape

    # --- data ------------------------------------------------------------------------------------------------
    def fit_data(self, labels: Any, num_classes: int | None, meta: dict[str, Any] | None = None) -> None:
        """Count the training classes; take the data's many/few thresholds where none are set."""
        k = int(num_classes or np.max(labels) + 1)
        self.train_counts = np.bincount(np.asarray(labels, np.int64), minlength=k).tolist()
        lt = (meta or {}).get("long_tail") or {}
        if self.many_threshold is None and "many_threshold" in lt:
            self.many_threshold = int(lt["many_threshold"])
        if self.few_threshold is None and "few_threshold" in lt:
            self.few_threshold = int(lt["few_threshold"])

    @property
    def counts(self) -> np.ndarray | None:
        c = self.class_counts if self.class_counts is not None else self.train_counts
        return None if c is None else np.asarray(c, np.int64)

    def _need_counts(self) -> np.ndarray:
        counts = self.counts
        if counts is None:
            raise ConfigError(f"long_tail criterion {self.criterion!r} needs the training class counts (fit_data)")
        if (counts == 0).any():
            raise ConfigError(f"class {int(np.flatnonzero(counts == 0)[0])} has no training samples")
        return counts

    # --- training --------------------------------------------------------------------------------------------
    def sampler(self, labels: Any, batch_size: int, seed: int, *, rank: int = 0, world_size: int = 1):
        if self.balance == "instance":
            return super().sampler(labels, batch_size, seed, rank=rank, world_size=world_size)
        from thrifty.data.balanced_sampler import ClassBalancedSampler

        k = None if self.counts is None else len(self.counts)
        return ClassBalancedSampler(labels, batch_size, seed, rank, world_size, k, self.epoch_length)

    def training_batch(self, inputs: Any, targets: torch.Tensor, seed: tuple[int, ...]) -> tuple[Any, torch.Tensor]:
        """Mixup (when `mixup` > 0): inputs mixed, targets (B, C) soft; seeded by (seed, epoch, step)."""
        if not self.mixup:
            return inputs, targets
        k = len(self.counts) if self.counts is not None else int(targets.max()) + 1
        return L.mixup(inputs, L.soft_targets(targets, k), self.mixup, np.random.default_rng([*seed, 2718]))

    def check_train(self, label_smoothing: float) -> None:
        if label_smoothing and self.criterion in ("las", "gml"):
            raise ConfigError(f"criterion {self.criterion!r} sets its own smoothing; drop --label-smoothing")

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        logits = outputs.float()
        c = logits.shape[-1]
        if self.criterion == "gml":
            return L.gml_loss(logits, targets, self._need_counts(), self.gml_p)
        t = L.soft_targets(targets, c, label_smoothing)
        if self.criterion == "ce":
            return L.weighted_soft_ce(logits, t)
        counts = self._need_counts()
        if self.criterion == "cb":
            return L.weighted_soft_ce(logits, t, L.class_balanced_weights(counts, self.beta))
        if self.criterion == "logit_adjust":
            return L.weighted_soft_ce(logits + self.tau * L.log_prior(counts, logits.device), t)
        eps = L.las_epsilon(counts, self.smooth_head, self.smooth_tail, self.smooth_shape)
        return L.las_loss(logits, t, torch.tensor(eps, dtype=torch.float32))

    def meter(self) -> Meter:
        many = 100 if self.many_threshold is None else self.many_threshold
        few = 20 if self.few_threshold is None else self.few_threshold
        return LongTailMeter(self.counts, many, few)
