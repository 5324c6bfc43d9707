"""`linear`: a linear probe on the pooled features of the frozen backbone (run under no_grad)."""

from dataclasses import dataclass
from typing import ClassVar

from thrifty.tuners.base import TunedModel
from thrifty.tuners.config import TunerConfig
from thrifty.tuners.registry import register_method


@dataclass
class LinearConfig(TunerConfig):
    """No options: only the head trains."""

    method: ClassVar[str] = "linear"


class LinearModel(TunedModel):
    """logits = head(pool(backbone(x))) with the backbone under no_grad: nothing inside it is saved for backward."""

    side = True


register_method("linear", LinearConfig, LinearModel)
__all__ = ["LinearConfig", "LinearModel"]
