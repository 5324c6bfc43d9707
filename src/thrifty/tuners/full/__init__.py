"""`full`: full fine-tuning of the backbone and the head."""

from dataclasses import dataclass
from typing import ClassVar

from thrifty.tuners.base import TunedModel
from thrifty.tuners.config import TunerConfig
from thrifty.tuners.registry import register_method


@dataclass
class FullConfig(TunerConfig):
    """No options: every backbone parameter trains (BatchNorm statistics update too)."""

    method: ClassVar[str] = "full"


class FullModel(TunedModel):
    train_backbone_mode = True

    def _setup(self) -> None:
        for p in self.backbone.parameters():
            p.requires_grad_(True)


register_method("full", FullConfig, FullModel)
__all__ = ["FullConfig", "FullModel"]
