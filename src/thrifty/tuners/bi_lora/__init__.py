"""`bi_lora`: LoRA on the attention's q and v with 1/2/4/8-bit adapters (Jie et al., ICCV 2023, `binary_adapter/
lora.py`).

q <- q + s * up_q(dropout(down_q(x))),  v <- v + s * up_v(dropout(down_v(x))),  K untouched; x is the attention
input (norm1(x) in a pre-LN ViT); down D->dim, up dim->D, bias-free QLinear, identity activation. The projection
Linear (timm's fused `qkv`, BERT's `query`/`value`) is wrapped by `QVAdapterLinear`, which adds the updates to the
output columns the backbone's `attention_qv_sites()` names. Spec: side-tuning.md §5.1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from thrifty.tuners.lowbit import LowBitAdapter, LowBitConfig, LowBitModel
from thrifty.tuners.registry import register_method


@dataclass
class BiLoraConfig(LowBitConfig):
    """Bi-LoRA: `bits`, `dim` (rank), `scale` (s), `dropout`, `bi_head`."""

    method: ClassVar[str] = "bi_lora"


class QVAdapterLinear(nn.Module):
    """base_layer(x) + s * adapter_j(x) on output columns [start_j, stop_j) (zeros on the other columns).

    timm fused qkv (B, N, 3D): adds [s*lora_q(x), 0, s*lora_v(x)], as the reference's concatenation."""

    def __init__(self, base_layer: nn.Linear, scale: float):
        super().__init__()
        self.base_layer = base_layer
        self.scale = scale
        self.slices: list[tuple[str, int, int]] = []

    @property
    def in_features(self) -> int:
        return int(self.base_layer.in_features)

    @property
    def out_features(self) -> int:
        return int(self.base_layer.out_features)

    def add_adapter(self, name: str, start: int, stop: int, adapter: nn.Module) -> None:
        self.add_module(name, adapter)
        self.slices = sorted([*self.slices, (name, start, stop)], key=lambda s: s[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)  # (..., out_features)
        pieces, pos = [], 0
        for name, start, stop in self.slices:
            if start > pos:
                pieces.append(out.new_zeros(*out.shape[:-1], start - pos))
            pieces.append(self.scale * self.get_submodule(name)(x))
            pos = stop
        if pos < out.shape[-1]:
            pieces.append(out.new_zeros(*out.shape[:-1], out.shape[-1] - pos))
        return out + (pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1))


class BiLoraModel(LowBitModel):
    def _inject(self) -> None:
        cfg = self.config
        self._adapters: list[LowBitAdapter] = []
        self._wrappers: list[QVAdapterLinear] = []
        for q_site, v_site in self.backbone.attention_qv_sites():
            for tag, site in (("lora_q", q_site), ("lora_v", v_site)):
                wrapper = getattr(site.parent, site.attr)
                if not isinstance(wrapper, QVAdapterLinear):
                    wrapper = QVAdapterLinear(wrapper, cfg.scale)
                    setattr(site.parent, site.attr, wrapper)
                    self._wrappers.append(wrapper)
                adapter = LowBitAdapter(
                    wrapper.in_features, cfg.dim, site.stop - site.start, cfg.bits, cfg.dropout, False
                )
                adapter.to(wrapper.base_layer.weight.device)
                wrapper.add_adapter(tag, site.start, site.stop, adapter)
                self._adapters.append(adapter)

    def adapter_list(self) -> list[LowBitAdapter]:
        return list(self._adapters)

    def adapter_modules(self) -> list[nn.Module]:
        return list(self._wrappers)


register_method(BiLoraConfig, BiLoraModel)
__all__ = ["BiLoraConfig", "BiLoraModel", "QVAdapterLinear"]
