"""`bi_adaptformer`: AdaptFormer with 1/2/4/8-bit adapters (Jie et al., ICCV 2023, `binary_adapter/adaptformer.py`).

Per block (pre-LN timm ViT):  x = x + attn(norm1(x));  x = x + mlp(norm2(x)) + s * up(dropout(relu(down(x)))),
the adapter reading the post-attention residual stream (all tokens), down D->dim and up dim->D bias-free QLinear.
Attachment comes from the backbone's `adapter_sites()` through adaptformer's `ParallelAdapterHooks` (BERT: reads
the FFN input, adds to the FFN output before its LayerNorm). Spec: side-tuning.md §5.1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from thrifty.tuners.adaptformer import ParallelAdapterHooks
from thrifty.tuners.lowbit import LowBitAdapter, LowBitConfig, LowBitModel
from thrifty.tuners.registry import register_method


@dataclass
class BiAdaptFormerConfig(LowBitConfig):
    """Bi-AdaptFormer: `bits`, `dim`, `scale` (s), `dropout`, `bi_head`."""

    method: ClassVar[str] = "bi_adaptformer"


class BiAdaptFormerModel(LowBitModel):
    def _inject(self) -> None:
        cfg = self.config
        sites = self.backbone.adapter_sites()
        self.bi_adaptformer = nn.ModuleList(
            LowBitAdapter(s.dim, cfg.dim, s.dim, cfg.bits, cfg.dropout, relu=True) for s in sites
        )
        self._hooks = ParallelAdapterHooks(sites, self.bi_adaptformer, cfg.scale)

    def adapter_list(self) -> list[LowBitAdapter]:
        return list(self.bi_adaptformer)


register_method(BiAdaptFormerConfig, BiAdaptFormerModel)
__all__ = ["BiAdaptFormerConfig", "BiAdaptFormerModel"]
