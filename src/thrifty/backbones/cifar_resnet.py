"""The CIFAR-style ResNet of the long-tail literature (He et al. 2016 §4.2; LDAM-DRW / MiSLAS `resnet32`), trained
from scratch: `cifar-resnet:<depth>[w<width>][s<seed>]`, depth = 6n + 2 (8, 20, 32, 44, 56, 110), base width 16,
init seed 0 (`s<seed>` draws another init, so the spec string alone reproduces the starting weights).

    embed:  conv3x3(3 -> w) + BN + ReLU                    (B, w, H, W)
    blocks: 3 stages of n BasicBlocks, widths w, 2w, 4w, strides 1, 2, 2; option-A shortcuts (stride-2
            subsampling + zero channel padding, no parameters), as LDAM-DRW's `resnet_cifar.py`
    pool:   global average -> (B, 4w) = num_features

No packaged weights exist: `source` is "random" (He/Kaiming-normal init of convs, as LDAM-DRW's `_weights_init`)
or a local `--checkpoint` (a safetensors state dict of this module's `model`). `reset_parameters_(seed)` re-draws
the init in place.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from thrifty.backbones.base import AdapterSite, Backbone, model_fingerprint
from thrifty.backbones.preprocess import ImagePreprocess
from thrifty.errors import SpecError


CIFAR_MEAN = (0.4914, 0.4822, 0.4465)  # the normalisation of LDAM-DRW / MiSLAS's CIFAR loaders
CIFAR_STD = (0.2023, 0.1994, 0.2010)


class BasicBlock(nn.Module):
    """x -> relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)); option-A shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.stride, self.pad = stride, (cout - cin) // 2 if cout != cin else 0
        self.reshape = stride != 1 or cin != cout

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if not self.reshape:
            return x
        return F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, self.pad, self.pad))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNetModel(nn.Module):
    def __init__(self, depth: int = 32, width: int = 16, in_chans: int = 3):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_chans, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        blocks, cin = [], width
        for stage, stride in enumerate((1, 2, 2)):
            cout = width * 2**stage
            for i in range(n):
                blocks.append(BasicBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.blocks = nn.ModuleList(blocks)
        self.num_features = cin
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()
                m.reset_running_stats()


class CifarResNet(Backbone):
    """Protocol view: `embed` = stem, `blocks` = the 3n BasicBlocks, `pool` = global average (B, 4w)."""

    kind = "cnn"

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.blocks

    @property
    def num_features(self) -> int:
        return int(self.model.num_features)

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        return F.relu(self.model.bn1(self.model.conv1(x))), None

    def pool(self, h: torch.Tensor, ctx: Any) -> torch.Tensor:
        return h.mean((2, 3))

    def adapter_sites(self) -> list[AdapterSite]:
        """Blocks that keep their shape (stride 1, same width): a parallel adapter beside each."""
        return [
            AdapterSite(read=b, add=b, dim=b.conv2.out_channels, channel_dim=1) for b in self.blocks if not b.reshape
        ]

    def default_target_modules(self) -> list[str]:
        return ["conv2"]

    def reset_parameters_(self, seed: int) -> CifarResNet:
        """Re-draw the random init with `seed` (the global RNG is left untouched); updates the weight hash."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model.reset_parameters()
        self.checkpoint_hash = model_fingerprint(self.model)
        return self


def parse_resnet_argument(argument: str) -> tuple[int, int, int | None]:
    """'32' -> (32, 16, None); '8w8s3' -> (8, 8, 3). Depth must be 6n + 2."""
    m = re.fullmatch(r"(\d+)(?:w(\d+))?(?:s(\d+))?", argument or "")
    if not m:
        raise SpecError(
            f"cifar-resnet:{argument}: expected cifar-resnet:<depth>[w<width>][s<seed>], e.g. cifar-resnet:32"
        )
    depth, width, seed = int(m.group(1)), int(m.group(2) or 16), m.group(3)
    if depth < 8 or (depth - 2) % 6 or width <= 0:
        raise SpecError(
            f"cifar-resnet depth must be 6n + 2 >= 8 (8, 20, 32, 44, 56, 110) and width > 0, got {argument}"
        )
    return depth, width, None if seed is None else int(seed)


def load_cifar_resnet(
    argument: str, *, checkpoint: str | None = None, pretrained: bool | None = None, image_size: int | None = None
) -> CifarResNet:
    depth, width, seed = parse_resnet_argument(argument)
    model = CifarResNetModel(depth, width)
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model.reset_parameters()
    source = "random"
    if checkpoint is not None:
        from thrifty.io import load_tensors

        state = load_tensors(checkpoint)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise SpecError(
                f"{checkpoint} is not a cifar-resnet:{argument} state dict: missing {missing[:3]}, unexpected "
                f"{unexpected[:3]}"
            )
        source = checkpoint
    elif pretrained is True:
        raise SpecError("cifar-resnet has no pretrained weights; it trains from scratch (or pass --checkpoint)")
    size = image_size or 32
    pre = ImagePreprocess(size=(size, size), mean=CIFAR_MEAN, std=CIFAR_STD, interpolation="bilinear")
    bb = CifarResNet(name=f"cifar-resnet:{argument}", model=model, preprocess=pre, source=source)
    bb.checkpoint_hash = model_fingerprint(model)
    return bb
