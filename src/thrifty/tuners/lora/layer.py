from __future__ import annotations

import math

import torch
from torch import nn


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

    def merged(self) -> nn.Linear:
        """A plain nn.Linear with the update folded into the weight."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.base_layer.bias is not None)
        out.to(self.base_layer.weight.device, self.base_layer.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.base_layer.weight + self.delta_weight())
            if self.base_layer.bias is not None:
                out.bias.copy_(self.base_layer.bias)
        return out
