"""`full`: full fine-tuning of the backbone and the head.

BatchNorm statistics (`bn_stats`): with `"frozen"` (default) BatchNorm layers stay in eval mode while training, so
they normalise with the pretrained running mean/var and only their affine weights train ("FrozenBN", common in
small-batch detection fine-tuning); dropout still follows `train()`. With
`"update"` BatchNorm uses batch statistics and moves its running statistics (PyTorch's default `train()`). At the
1k protocol (30 steps per epoch, batch 32) `update` leaves EfficientNet-Lite0's running statistics (momentum 0.01)
far from the batch statistics the weights were trained with, and the first batches of out-of-domain images
(Fashion-MNIST, digits) shift every normalisation at once; `frozen` starts exactly where the adapters start (the
pretrained network, see `linear`). Backbones without BatchNorm (ViT, MiniLM) are unaffected by the option.
"""

from dataclasses import dataclass, field
from typing import ClassVar

from torch import nn

from thrifty.tuners.base import TunedModel
from thrifty.tuners.config import TunerConfig, check
from thrifty.tuners.registry import register_method


BN_STATS = ("frozen", "update")


@dataclass
class FullConfig(TunerConfig):
    """Every backbone parameter trains; `bn_stats` says whether BatchNorm running statistics update."""

    method: ClassVar[str] = "full"
    default_lr: ClassVar[float] = 1e-4  # every weight moves: the adapters' 1e-3 destroys the pretrained features

    bn_stats: str = field(default="frozen", metadata={"help": "frozen | update (BatchNorm running statistics)"})

    def __post_init__(self) -> None:
        check(self.bn_stats in BN_STATS, f"`bn_stats` must be one of {', '.join(BN_STATS)}, got {self.bn_stats!r}")


class FullModel(TunedModel):
    train_backbone_mode = True  # dropout follows train(); BatchNorm too when bn_stats == "update"

    def _setup(self) -> None:
        for p in self.backbone.parameters():
            p.requires_grad_(True)

    def train(self, mode: bool = True) -> "FullModel":
        super().train(mode)
        if mode and self.config.bn_stats == "frozen":
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self


register_method(FullConfig, FullModel)
__all__ = ["FullConfig", "FullModel"]
