"""Quantized embedding tables: symmetric int codes C in [-(2^(b-1) - 1), 2^(b-1) - 1] with RepQ-ViT's percentile
search (as for weights), one scale per row v (> 4 bits) or per block of `block_size` values of a row (<= 4 bits):

    per row:    E_hat[v, d] = s[v] * C[v, d]            s (V,)
    per block:  E_hat[v, d] = s[v, d // B] * C[v, d]     s (V, D / B), B a power of 2 >= 16 dividing D

A lookup `E_hat[ids]` is exactly one float32 product per value, which is what the ONNX export computes: per row,
`Gather` on the int8 table and on the scales, `Cast`, `Mul` (thrifty.compress.quant.int_ops.gather_rows); per
block, onnxruntime's `com.microsoft.GatherBlockQuantized` on the table stored as INT4 (`gather_blocks` here; the
table takes V * D / 2 bytes). Blocks rather than rows at <= 4 bits: 4-bit rows of 384 values lose more to one
outlier than 8-bit rows do, and the scales (V * D / B floats, float16 with `half_scales`) stay small at B = 128.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from thrifty.compress.quant.layers import QuantModule
from thrifty.compress.quant.quantizers import eager
from thrifty.compress.quant.weights import search_weight, search_weight_blocks


class QuantEmbedding(QuantModule):
    """Swap for nn.Embedding (no max_norm / sparse options). ids (...) -> (..., D)."""

    kind = "embedding"

    def __init__(self, layer: nn.Embedding):
        super().__init__()
        self.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
        self.num_embeddings, self.embedding_dim = layer.num_embeddings, layer.embedding_dim
        self.padding_idx = layer.padding_idx
        self.bits = 8
        self.block_size = 0  # 0: one scale per row
        self.register_buffer("weight_codes", None)
        self.register_buffer("weight_scale", None)
        self.quant_enabled = True
        self.export_int = False

    @property
    def converted(self) -> bool:
        return self.weight_codes is not None

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "bits": self.bits, "block_size": self.block_size}

    def quantize_weight_(
        self, bits: int, percentiles=None, p: float = 2.0, half_scales: bool = False, block_size: int = 128
    ) -> None:
        """Codes and scales: per block (`table_block(D, block_size)`) at <= 4 bits where such a block exists,
        else per row. `half_scales`: scales rounded to float16 values (stored exactly in float16 by the export)."""
        kwargs = {} if percentiles is None else {"percentiles": tuple(percentiles)}
        block = table_block(self.embedding_dim, block_size) if bits <= 4 else 0
        w = self.weight.detach()
        if block:
            codes, scale, _ = search_weight_blocks(w, bits, block, True, p=p, half_scales=half_scales, **kwargs)
        else:
            codes, scale, _ = search_weight(w, bits, True, p=p, half_scales=half_scales, **kwargs)
        self.bits, self.block_size = int(bits), block
        self.weight_codes, self.weight_scale = codes, scale

    def empty_like_converted_(self, spec: dict[str, Any]) -> None:
        self.bits, self.block_size = int(spec["bits"]), int(spec.get("block_size", 0))
        v, d = self.num_embeddings, self.embedding_dim
        self.weight_codes = torch.zeros(v, d, dtype=torch.int8)
        self.weight_scale = torch.ones(v, d // self.block_size) if self.block_size else torch.ones(v)

    def pack_(self) -> None:
        self.weight = None

    def _dequantized(self) -> torch.Tensor:
        codes, scale = self.weight_codes, self.weight_scale
        if scale.dim() == 2:  # per block
            return (codes.reshape(*scale.shape, -1).float() * scale[..., None]).reshape(codes.shape)
        return codes.float() * scale[:, None]

    def table(self) -> torch.Tensor:
        """The dequantized table (V, D), cached (eager runs) while codes and scales are unmodified."""
        if not eager(self.weight_codes) or self.weight_codes.is_inference() or self.weight_scale.is_inference():
            return self._dequantized()
        key = (self.weight_codes, self.weight_codes._version, self.weight_scale, self.weight_scale._version)
        cached = self.__dict__.get("_table")
        if (
            cached is None
            or any(a is not b for a, b in zip(cached[0][::2], key[::2], strict=True))
            or (cached[0][1::2] != key[1::2])
        ):
            cached = (key, self._dequantized())
            self.__dict__["_table"] = cached
        return cached[1]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.quant_enabled and self.converted:
            if self.export_int:
                from thrifty.compress.quant.int_ops import gather_rows

                if self.weight_scale.dim() == 2:
                    return gather_blocks(self.weight_codes, self.weight_scale, ids, self.block_size)
                return gather_rows(self.weight_codes, self.weight_scale, ids)
            return F.embedding(ids, self.table(), self.padding_idx)
        if self.weight is None:
            raise RuntimeError("this embedding was packed (float table dropped); float runs need an unpacked copy")
        return F.embedding(ids, self.weight, self.padding_idx)


def table_block(dim: int, block_size: int = 128) -> int:
    """The largest power of 2 in [16, block_size] that divides `dim` (GatherBlockQuantized's blocks), 0 if none."""
    b = 1 << (max(block_size, 1).bit_length() - 1)
    while b >= 16 and dim % b:
        b //= 2
    return b if b >= 16 else 0


@torch.library.custom_op("thrifty::gather_blocks", mutates_args=())
def gather_blocks(codes: torch.Tensor, scale: torch.Tensor, ids: torch.Tensor, block_size: int) -> torch.Tensor:
    """codes (V, D) int8 in [-8, 7], scale (V, D / B), ids (...) int64 -> (..., D) = codes[ids] * scale[ids] per
    block (the simulation of GatherBlockQuantized: one float32 product per value)."""
    rows = codes[ids].float().reshape(*ids.shape, scale.shape[1], block_size)
    return (rows * scale[ids].unsqueeze(-1)).reshape(*ids.shape, codes.shape[1])


@gather_blocks.register_fake
def _(codes, scale, ids, block_size):
    return torch.empty((*ids.shape, codes.shape[1]))


def _register_gather_block_quantized() -> None:
    """onnxruntime's contrib GatherBlockQuantized signature for the exporter's op builder (idempotent). T1 also
    admits int8 here: the exporter writes the codes as int8 and `finalize_onnx_` stores them as INT4."""
    import onnx
    from onnx.defs import OpSchema

    try:
        onnx.defs.get_schema("GatherBlockQuantized", 1, "com.microsoft")
        return
    except onnx.defs.SchemaError:
        pass
    par, opt, attr = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional, OpSchema.Attribute
    schema = OpSchema(
        "GatherBlockQuantized",
        "com.microsoft",
        1,
        inputs=[
            par("data", "T1"),
            par("indices", "Tind"),
            par("scales", "T2"),
            par("zero_points", "T1", "", param_option=opt),
        ],
        outputs=[par("output", "T2")],
        type_constraints=[
            ("T1", ["tensor(int4)", "tensor(uint4)", "tensor(uint8)", "tensor(int8)"], ""),
            ("T2", ["tensor(float)"], ""),
            ("Tind", ["tensor(int32)", "tensor(int64)"], ""),
        ],
        attributes=[attr(n, OpSchema.AttrType.INT, "") for n in ("gather_axis", "quantize_axis", "block_size")],
    )
    onnx.defs.register_schema(schema)


def gather_blocks_onnx(codes, scale, ids, block_size: int):
    from onnxscript.values import Opset

    _register_gather_block_quantized()
    msft = Opset("com.microsoft", 1)
    return msft.GatherBlockQuantized(codes, ids, scale, gather_axis=0, quantize_axis=1, block_size=block_size)


def translation_table() -> dict:
    return {torch.ops.thrifty.gather_blocks.default: gather_blocks_onnx}
