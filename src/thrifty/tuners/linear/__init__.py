"""`linear`: a linear probe on the pooled features of the frozen backbone (run under no_grad)."""

from dataclasses import dataclass
from typing import ClassVar

import torch

from thrifty.features.taps import POOLED
from thrifty.tuners.config import TunerConfig
from thrifty.tuners.registry import register_method
from thrifty.tuners.side import SideTuner


@dataclass
class LinearConfig(TunerConfig):
    """No options: only the head trains."""

    method: ClassVar[str] = "linear"


class LinearModel(SideTuner):
    """logits = head(pool(backbone(x))) with the backbone under no_grad: nothing inside it is saved for backward.
    Reads the `pooled` tap, so it trains from a feature cache too."""

    def tap_names(self) -> list[str]:
        return [POOLED]

    def features_from_taps(self, taps: dict[str, torch.Tensor]) -> torch.Tensor:
        return taps[POOLED]


register_method(LinearConfig, LinearModel)
__all__ = ["LinearConfig", "LinearModel"]
