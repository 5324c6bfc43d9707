"""`adaptformer`: a parallel bottleneck adapter beside each block's MLP (Chen et al., NeurIPS 2022).

In a pre-LN timm block: x = x + attn(norm1(x)); x = x + mlp(norm2(x)) + s * up(dropout(relu(down(x)))), the adapter
reading the post-attention residual stream (the input of norm2). In post-LN BERT the adapter reads the FFN input
(the attention output) and adds to the FFN output before the block's LayerNorm. Sites come from the backbone's
`adapter_sites()`; the adapter is attached with forward hooks, so the upstream block is not forked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from thrifty.tuners.base import TunedModel
from thrifty.tuners.config import TunerConfig, check
from thrifty.tuners.registry import register_method


@dataclass
class AdaptFormerConfig(TunerConfig):
    """AdaptFormer (Chen et al., NeurIPS 2022): a parallel bottleneck adapter beside each block's MLP, scaled by s."""

    method: ClassVar[str] = "adaptformer"
    aliases: ClassVar[dict[str, str]] = {"dim": "bottleneck", "ffn_num": "bottleneck", "s": "scale"}

    bottleneck: int = field(default=8, metadata={"help": "Hidden width of the adapter (dim)."})
    scale: float = field(default=0.1, metadata={"help": "s: the adapter output is multiplied by it."})
    dropout: float = field(default=0.1, metadata={"help": "Dropout after the ReLU."})
    bias: bool = field(default=True, metadata={"help": "Biases in down/up projections."})

    def __post_init__(self) -> None:
        check(
            isinstance(self.bottleneck, int) and self.bottleneck > 0,
            f"`bottleneck` must be a positive integer, got {self.bottleneck!r}",
        )
        check(0.0 <= self.dropout < 1.0, f"`dropout` must be in [0, 1), got {self.dropout!r}")


class Bottleneck(nn.Module):
    """up(dropout(relu(down(x)))): (..., D) -> (..., D); up is zero at init so the model starts as the backbone."""

    def __init__(self, dim: int, bottleneck: int, dropout: float, bias: bool):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck, bias=bias)
        self.up = nn.Linear(bottleneck, dim, bias=bias)
        self.dropout = nn.Dropout(dropout)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)
        if bias:
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.dropout(torch.relu(self.down(x))))


class ParallelAdapterHooks:
    """Attaches `adapters[i]` to site i: a forward pre-hook on `read` keeps its input, a forward hook on `add`
    returns `output + scale * adapter(kept input)`. Shared by every parallel-adapter method."""

    def __init__(self, sites, adapters: nn.ModuleList, scale: float):
        self.handles = []
        for site, adapter in zip(sites, adapters):
            store: dict[str, torch.Tensor] = {}
            self.handles.append(site.read.register_forward_pre_hook(self._keep(store)))
            self.handles.append(site.add.register_forward_hook(self._add(store, adapter, scale, site.channel_dim)))

    @staticmethod
    def _keep(store):
        def hook(module, args):
            store["x"] = args[0]

        return hook

    @staticmethod
    def _add(store, adapter, scale, channel_dim):
        def hook(module, args, output):
            x = store.pop("x")
            if channel_dim != -1:  # adapters are written for channels-last inputs
                return output + scale * adapter(x.movedim(channel_dim, -1)).movedim(-1, channel_dim)
            return output + scale * adapter(x)

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class AdaptFormerModel(TunedModel):
    def _setup(self) -> None:
        cfg = self.config
        sites = self.backbone.adapter_sites()
        self.adaptformer = nn.ModuleList(Bottleneck(s.dim, cfg.bottleneck, cfg.dropout, cfg.bias) for s in sites)
        self._hooks = ParallelAdapterHooks(sites, self.adaptformer, cfg.scale)


register_method(AdaptFormerConfig, AdaptFormerModel)
__all__ = ["AdaptFormerConfig", "AdaptFormerModel", "Bottleneck", "ParallelAdapterHooks"]
