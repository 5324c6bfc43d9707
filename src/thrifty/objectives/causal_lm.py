"""`causal_lm`: next-token prediction. The head is the model's own LM head; targets are the input tokens with
padding masked (-100, as Hugging Face labels); loss = mean cross-entropy of token t+1 given tokens <= t;
perplexity = exp(total NLL / predicted tokens) over the split (token-weighted, not a mean of batch values)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from thrifty.errors import ConfigError
from thrifty.objectives.base import Meter, Objective


IGNORE = -100


def shifted_nll(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """logits (B, T, V), targets (B, T) -> NLL of targets[:, 1:] under logits[:, :-1], IGNORE positions skipped."""
    v = logits.shape[-1]
    return nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, v).float(), targets[:, 1:].reshape(-1), ignore_index=IGNORE, reduction=reduction
    )


class PerplexityMeter(Meter):
    def __init__(self) -> None:
        self.nll, self.tokens, self.samples = 0.0, 0, 0

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.nll += float(shifted_nll(outputs, targets, reduction="sum"))
        self.tokens += int((targets[:, 1:] != IGNORE).sum())
        self.samples += len(targets)

    def compute(self) -> dict[str, float]:
        loss = self.nll / max(1, self.tokens)
        return {"perplexity": math.exp(loss), "loss": loss, "tokens": self.tokens, "samples": self.samples}


@dataclass
class CausalLMObjective(Objective):
    """outputs = the model's logits (B, T, V); no head beyond the model's own LM head (`backbone.lm_head`)."""

    name: ClassVar[str] = "causal_lm"
    metric_names: ClassVar[tuple[str, ...]] = ("perplexity", "loss")
    selection_metric: ClassVar[str] = "perplexity"
    greater_is_better: ClassVar[bool] = False
    percent: ClassVar[bool] = False
    needs_classes: ClassVar[bool] = False

    def num_outputs(self, num_classes: int | None) -> None:
        return None

    def build_head(self, backbone: nn.Module, num_outputs: int | None) -> nn.Module:
        head = getattr(backbone, "lm_head", None)
        if not isinstance(head, nn.Module):
            raise ConfigError(
                f"objective 'causal_lm' needs a language-model backbone with its own LM head; "
                f"{getattr(backbone, 'name', type(backbone).__name__)} has none (use a decoder backbone)"
            )
        return head

    def targets(self, inputs: Any, labels: torch.Tensor) -> torch.Tensor:
        if not isinstance(inputs, dict) or "input_ids" not in inputs:
            raise ConfigError("objective 'causal_lm' needs tokenized text inputs (input_ids, attention_mask)")
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        return ids if mask is None else ids.masked_fill(mask == 0, IGNORE)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        return shifted_nll(outputs, targets)

    def meter(self) -> Meter:
        return PerplexityMeter()
