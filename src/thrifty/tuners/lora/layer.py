from __future__ import annotations

import copy
import math

import torch
from torch import nn

from thrifty.errors import ConfigError


class LoraLinear(nn.Module):
    """Wraps `base_layer` (frozen nn.Linear): y = base(x) + scaling * lora_B(lora_A(dropout(x))).

    Shapes: lora_A.weight (r, in), lora_B.weight (out, r); init as PEFT: A kaiming-uniform(a=sqrt(5)), B zeros.
    """

    def __init__(self, base_layer: nn.Linear, r: int, lora_alpha: float, lora_dropout: float = 0.0):
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.scaling = lora_alpha / r
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        ref = base_layer.weight
        self.lora_A.to(device=ref.device, dtype=ref.dtype)
        self.lora_B.to(device=ref.device, dtype=ref.dtype)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def merged(self) -> nn.Module:
        """A copy of the base layer with the update folded into its weight."""
        out = copy.deepcopy(self.base_layer)
        with torch.no_grad():
            out.weight.add_(self.delta_weight().to(out.weight.dtype))
        return out


class LoraConv2d(LoraLinear):
    """PEFT's Conv2d LoRA: y = conv(x) + scaling * B(A(dropout(x))), A a conv with the base's kernel, stride,
    padding and dilation into r channels, B a 1x1 conv (r -> out). Weights: A (r, in, kh, kw), B (out, r, 1, 1).
    TF-style "same" convs (a `static_padding` module, as in EfficientNet) are padded the same way."""

    def __init__(self, base_layer: nn.Conv2d, r: int, lora_alpha: float, lora_dropout: float = 0.0):
        nn.Module.__init__(self)
        if base_layer.groups != 1:
            raise ConfigError(
                f"LoRA needs an ungrouped conv; this one has groups={base_layer.groups}. Exclude "
                "depthwise convs with exclude_modules or pick pointwise targets"
            )
        self.base_layer = base_layer
        b = base_layer
        self.lora_A = nn.Conv2d(b.in_channels, r, b.kernel_size, b.stride, b.padding, b.dilation, bias=False)
        self.lora_B = nn.Conv2d(r, b.out_channels, 1, bias=False)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.scaling = lora_alpha / r
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_A.to(device=b.weight.device, dtype=b.weight.dtype)
        self.lora_B.to(device=b.weight.device, dtype=b.weight.dtype)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_channels

    @property
    def out_features(self) -> int:
        return self.base_layer.out_channels

    def delta_weight(self) -> torch.Tensor:
        b, a = self.lora_B.weight[:, :, 0, 0], self.lora_A.weight  # (out, r), (r, in, kh, kw)
        return torch.einsum("or,rikl->oikl", b, a) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = getattr(self.base_layer, "static_padding", None)
        z = self.lora_dropout(x)
        if pad is not None:
            z = pad(z)
        return self.base_layer(x) + self.lora_B(self.lora_A(z)) * self.scaling
