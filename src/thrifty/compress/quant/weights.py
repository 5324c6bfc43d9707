"""Weight quantization: RepQ-ViT's percentile search per output channel (or per block of a row) and the
dequantization ops the quantized layers run (each exports to one DequantizeLinear on the integer codes).

Weights are symmetric signed with the narrow range `[-(2^(b-1) - 1), 2^(b-1) - 1]` (zero point 0, as int8 engines
expect) or asymmetric unsigned; the search and its uniform quantizer are those of thrifty.compress.quant.quantizers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from thrifty.compress.quant.quantizers import DEFAULT_PERCENTILES, quant_dequant, quantiles, search_asymmetric


# --- weight dequantization as one op (exports to a DequantizeLinear on the int8 codes) --------------------------
@torch.library.custom_op("thrifty::dequantize_per_channel", mutates_args=())
def dequantize_per_channel(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """(codes - zero_point) * scale along axis 0; codes int8/uint8 (C, ...), scale float32 (C,)."""
    shape = (-1,) + (1,) * (codes.dim() - 1)
    return (codes.float() - zero_point.float().view(shape)) * scale.view(shape)


@dequantize_per_channel.register_fake
def _(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    return torch.empty(codes.shape, dtype=torch.float32, device=codes.device)


@torch.library.custom_op("thrifty::dequantize_blocks", mutates_args=())
def dequantize_blocks(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """Block-wise (codes - zero_point) * scale: codes (N, K) int8/uint8, scale float32 and zero_point (N, K / B),
    one pair per block of B = K / scale.shape[1] consecutive values of a row (`PTQConfig.weight_block_size`)."""
    n, g = scale.shape
    q = codes.float().reshape(n, g, -1) - zero_point.float()[..., None]
    return (q * scale[..., None]).reshape(codes.shape)


@dequantize_blocks.register_fake
def _(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    return torch.empty(codes.shape, dtype=torch.float32, device=codes.device)


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """Per output channel (scale (C,)) or per block along the input (scale (N, K / B), Linear weights only)."""
    if scale.dim() == 2:
        return dequantize_blocks(codes, scale, zero_point)
    return dequantize_per_channel(codes, scale, zero_point)


def weight_range(bits: int, symmetric: bool) -> tuple[int, int]:
    if symmetric:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def half_representable(s: torch.Tensor) -> torch.Tensor:
    """Positive float32 scales -> the nearest float16 values (relative change <= 2^-11), as float32; scales below
    float16's smallest subnormal (2^-24) become 2^-24, above its largest finite value 65504."""
    return s.float().clamp(2.0**-24, 65504.0).half().float().clamp_min(2.0**-24)


def search_weight(
    w: torch.Tensor,
    bits: int,
    symmetric: bool = True,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    p: float = 2.0,
    half_scales: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-output-channel weight quantization. w (C, ...) -> codes (C, ...) int8|uint8, scale (C,), zero_point (C,).

    Candidates: the percentiles plus the full range (1.0); the lowest L_p error wins per channel. `half_scales`:
    every candidate scale is first rounded to a float16 value (`half_representable`), so an exporter can store the
    scales in float16 exactly (the codes are computed with the rounded scale)."""
    flat = w.detach().reshape(w.shape[0], -1).float()
    qmin, qmax = weight_range(bits, symmetric)
    pcts = (*percentiles, 1.0)
    if not symmetric:
        scale, zp = search_asymmetric(flat, bits, pcts, p)
    else:
        best_err = flat.new_full((flat.shape[0],), float("inf"))
        scale = flat.new_ones(flat.shape[0])
        clips = quantiles(flat.abs(), pcts)
        for clip in clips:
            s = torch.clamp(clip / qmax, min=1e-8)
            s = half_representable(s) if half_scales else s
            err = (flat - quant_dequant(flat, s[:, None], 0.0, qmin, qmax)).abs().pow(p).sum(1)
            better = err < best_err
            best_err, scale = torch.where(better, err, best_err), torch.where(better, s, scale)
        zp = torch.zeros_like(scale)
    if half_scales:
        scale = half_representable(scale)
    codes = torch.clamp(torch.round(flat / scale[:, None]) + zp[:, None], qmin, qmax)
    dtype = torch.int8 if symmetric else torch.uint8
    return codes.reshape(w.shape).to(dtype), scale, zp.to(dtype)


def search_weight_blocks(
    w: torch.Tensor,
    bits: int,
    block_size: int,
    symmetric: bool = True,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    p: float = 2.0,
    half_scales: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block-wise weight quantization: `search_weight` on every block of `block_size` values along a row.
    w (N, K), K a multiple of B -> codes (N, K), scale (N, K / B), zero_point (N, K / B)."""
    n, k = w.shape
    blocks = w.reshape(n * k // block_size, block_size)
    codes, scale, zp = search_weight(blocks, bits, symmetric, percentiles, p, half_scales)
    return codes.reshape(n, k), scale.reshape(n, -1), zp.reshape(n, -1)
