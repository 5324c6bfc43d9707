"""Quantized embedding tables: per-row symmetric int codes, `E_hat[v] = s_v * C[v]` (C int8 in [-(2^(b-1) - 1),
2^(b-1) - 1], one scale per row v, RepQ-ViT's percentile search per row as for weights).

A lookup `E_hat[ids]` is exactly `C[ids] * s[ids]` (one float multiplication per value), which is what the ONNX
export computes: `Gather` on the int8 table and on the scales, `Cast`, `Mul` (thrifty.compress.quant.int_ops).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from thrifty.compress.quant.layers import QuantModule
from thrifty.compress.quant.quantizers import eager, search_weight


class QuantEmbedding(QuantModule):
    """Swap for nn.Embedding (no max_norm / sparse options). ids (...) -> (..., D)."""

    kind = "embedding"

    def __init__(self, layer: nn.Embedding):
        super().__init__()
        self.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
        self.num_embeddings, self.embedding_dim = layer.num_embeddings, layer.embedding_dim
        self.padding_idx = layer.padding_idx
        self.bits = 8
        self.register_buffer("weight_codes", None)
        self.register_buffer("weight_scale", None)
        self.quant_enabled = True
        self.export_int = False

    @property
    def converted(self) -> bool:
        return self.weight_codes is not None

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "bits": self.bits}

    def quantize_weight_(self, bits: int, percentiles=None, p: float = 2.0) -> None:
        kwargs = {} if percentiles is None else {"percentiles": tuple(percentiles)}
        codes, scale, _ = search_weight(self.weight.detach(), bits, True, p=p, **kwargs)
        self.bits, self.weight_codes, self.weight_scale = int(bits), codes, scale

    def empty_like_converted_(self, spec: dict[str, Any]) -> None:
        self.bits = int(spec["bits"])
        self.weight_codes = torch.zeros(self.num_embeddings, self.embedding_dim, dtype=torch.int8)
        self.weight_scale = torch.ones(self.num_embeddings)

    def pack_(self) -> None:
        self.weight = None

    def table(self) -> torch.Tensor:
        """The dequantized table (V, D), cached (eager runs) while codes and scales are unmodified."""
        if not eager(self.weight_codes) or self.weight_codes.is_inference() or self.weight_scale.is_inference():
            return self.weight_codes.float() * self.weight_scale[:, None]
        key = (self.weight_codes, self.weight_codes._version, self.weight_scale, self.weight_scale._version)
        cached = self.__dict__.get("_table")
        if (
            cached is None
            or any(a is not b for a, b in zip(cached[0][::2], key[::2], strict=True))
            or (cached[0][1::2] != key[1::2])
        ):
            cached = (key, self.weight_codes.float() * self.weight_scale[:, None])
            self.__dict__["_table"] = cached
        return cached[1]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.quant_enabled and self.converted:
            if self.export_int:
                from thrifty.compress.quant.int_ops import gather_rows

                return gather_rows(self.weight_codes, self.weight_scale, ids)
            return F.embedding(ids, self.table(), self.padding_idx)
        if self.weight is None:
            raise RuntimeError("this embedding was packed (float table dropped); float runs need an unpacked copy")
        return F.embedding(ids, self.weight, self.padding_idx)
