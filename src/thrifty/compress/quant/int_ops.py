"""The deployment ops: what onnxruntime runs on integer kernels, as torch custom ops whose eager forward is the
PyTorch simulation (the same values the quantized layers compute) and whose ONNX translation is the engine's op.

    qlinear      y = (Q(x) - z_x) s_x  (C - z_w)^T s_w + b  ->  QuantizeLinear + com.microsoft.MatMulIntegerToFloat
    qconv        the same for Conv2d                        ->  QuantizeLinear + ConvInteger + Cast + Mul + Add
    qmatmul      A B, both already on a uint8 grid          ->  2 x QuantizeLinear + MatMulIntegerToFloat
    gather_rows  C[ids] * s[ids] (int8 table, row scales)   ->  Gather (int8) + Gather (scales) + Cast + Mul
    matmul_nbits x W_hat^T + b, W_hat block-wise 4-bit      ->  com.microsoft.MatMulNBits

Quantization follows ONNX QuantizeLinear: q = saturate(round_half_even(x / s) + z) in uint8 (activations: uint8
with zero point, weights: int8 symmetric, zero point 0; the signedness onnxruntime's x86 u8s8 kernels take).
Integer products accumulate exactly in int32, so engine and simulation differ only by float rounding of the sums.

MatMulNBits layout (onnxruntime contrib op, bits=4): B (N, n_blocks, block_size / 2) uint8, element k of a block
in byte k // 2, low nibble first; scales (N * n_blocks,) float; zero points packed two blocks per byte (low
nibble first), default 8. W_hat[n, k] = (q[n, k] - zp[n, k // block]) * scale[n, k // block]; K is padded to a
multiple of block_size with code zp (zero).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from thrifty.compress.quant.quantizers import fake_quant_uint8
from thrifty.compress.quant.weights import dequantize_per_channel


# --- simulation (eager) -------------------------------------------------------------------------------------------
@torch.library.custom_op("thrifty::qlinear", mutates_args=())
def qlinear(
    x: torch.Tensor,
    x_scale: torch.Tensor,
    x_zp: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    codes: torch.Tensor,
    w_scale: torch.Tensor,
    w_zp: torch.Tensor,
    bias: torch.Tensor,
    clip: bool,
) -> torch.Tensor:
    """x (..., K) float; codes (N, K) int8|uint8; w_scale, w_zp, bias (N,). clip: a_bits < 8 (Clip to [lo, hi])."""
    xq = fake_quant_uint8(x, x_scale, x_zp, lo, hi, -1)
    return F.linear(xq, dequantize_per_channel(codes, w_scale, w_zp), bias)


@qlinear.register_fake
def _(x, x_scale, x_zp, lo, hi, codes, w_scale, w_zp, bias, clip):
    return x.new_empty((*x.shape[:-1], codes.shape[0]))


@torch.library.custom_op("thrifty::qconv", mutates_args=())
def qconv(
    x: torch.Tensor,
    x_scale: torch.Tensor,
    x_zp: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    codes: torch.Tensor,
    w_scale: torch.Tensor,
    w_zp: torch.Tensor,
    bias: torch.Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    clip: bool,
) -> torch.Tensor:
    """x (B, C, H, W); codes (O, C / groups, kh, kw). Zero padding pads with the zero point (the code of 0.0)."""
    xq = fake_quant_uint8(x, x_scale, x_zp, lo, hi, -1)
    return F.conv2d(xq, dequantize_per_channel(codes, w_scale, w_zp), bias, stride, padding, dilation, groups)


@qconv.register_fake
def _(x, x_scale, x_zp, lo, hi, codes, w_scale, w_zp, bias, stride, padding, dilation, groups, clip):
    kh, kw = codes.shape[2:]
    h = (x.shape[2] + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    w = (x.shape[3] + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return x.new_empty((x.shape[0], codes.shape[0], h, w))


@torch.library.custom_op("thrifty::qmatmul", mutates_args=())
def qmatmul(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    a_zp: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    b_zp: torch.Tensor,
) -> torch.Tensor:
    """a @ b for operands already fake-quantized (uint8 grid, per-tensor 0-d scale and zero point)."""
    return torch.matmul(a, b)


@qmatmul.register_fake
def _(a, a_scale, a_zp, b, b_scale, b_zp):
    return torch.empty((*torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]), a.shape[-2], b.shape[-1]))


@torch.library.custom_op("thrifty::gather_rows", mutates_args=())
def gather_rows(codes: torch.Tensor, scale: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """codes (V, D) int8, scale (V,), ids (...) int64 -> (..., D) = codes[ids] * scale[ids]."""
    return codes[ids].float() * scale[ids].unsqueeze(-1)


@gather_rows.register_fake
def _(codes, scale, ids):
    return torch.empty((*ids.shape, codes.shape[1]))


@torch.library.custom_op("thrifty::matmul_nbits", mutates_args=())
def matmul_nbits(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor,
    bias: torch.Tensor,
    k: int,
    n: int,
    block_size: int,
    accuracy_level: int,
) -> torch.Tensor:
    """x (..., K) @ W_hat^T + bias with W_hat unpacked from the MatMulNBits blobs (fp32 simulation); an empty
    `zero_points` means the default 8. accuracy_level only reaches the engine (0: float compute, exact)."""
    return F.linear(x, unpack_nbits(packed, scales, zero_points, k, block_size), bias)


@matmul_nbits.register_fake
def _(x, packed, scales, zero_points, bias, k, n, block_size, accuracy_level):
    return x.new_empty((*x.shape[:-1], n))


# --- MatMulNBits packing --------------------------------------------------------------------------------------------
def _pack_nibbles_rows(q: torch.Tensor) -> torch.Tensor:
    """(R, 2m) values 0..15 -> (R, m) uint8, even index in the low nibble."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def pack_nbits(
    codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, symmetric: bool, block_size: int = 32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel 4-bit codes (N, K) (int8 in [-7, 7] when symmetric, uint8 in [0, 15] with zero points otherwise)
    and scales (N,) -> MatMulNBits (B (N, n_blocks, block_size / 2) uint8, scales (N * n_blocks,), zero points
    (N * ceil(n_blocks / 2),) uint8; 8 for symmetric codes). Every block of row n gets scale[n]:
    a per-channel scale is the block-wise format with equal blocks (a folded CWAC a_n is in scale[n]).
    Block scales (scale and zero_point (N, K / block_size), `weight_block_size`) are written as they are."""
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"MatMulNBits block_size must be a power of 2 >= 16, got {block_size}")
    n, k = codes.shape
    blocks = math.ceil(k / block_size)
    if scale.dim() == 2 and (k % block_size or scale.shape != (n, blocks)):
        raise ValueError(f"pack_nbits: block scales {tuple(scale.shape)} do not fit K={k} in blocks of {block_size}")
    per_block = scale.dim() == 2
    if symmetric:
        q, zp = codes.to(torch.int16) + 8, torch.full((n, blocks) if per_block else (n,), 8, dtype=torch.int16)
    else:
        q, zp = codes.to(torch.int16), zero_point.to(torch.int16)
    if per_block:
        full = q
    else:
        full = zp[:, None].expand(n, blocks * block_size).clone()  # K padding: the zero point (value 0)
        full[:, :k] = q
    if int(full.min()) < 0 or int(full.max()) > 15:
        raise ValueError("pack_nbits: codes do not fit 4 bits")
    packed = _pack_nibbles_rows(full).reshape(n, blocks, block_size // 2)
    scales = scale.float().reshape(n, -1).expand(n, blocks).reshape(-1).contiguous()
    zps = zp.reshape(n, -1).expand(n, blocks)
    if blocks % 2:
        zps = torch.cat([zps, torch.full((n, 1), 8, dtype=zps.dtype)], 1)
    return packed, scales, _pack_nibbles_rows(zps).reshape(-1)


def unpack_nbits(
    packed: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor, k: int, block_size: int
) -> torch.Tensor:
    """MatMulNBits blobs -> W_hat (N, K) float32 (the engine's dequantization)."""
    n, blocks = packed.shape[0], packed.shape[1]
    p = packed.reshape(n, -1).to(torch.int16)
    q = torch.stack([p & 0xF, p >> 4], -1).reshape(n, blocks, block_size).float()
    if zero_points.numel():
        z = zero_points.reshape(n, -1).to(torch.int16)
        zp = torch.stack([z & 0xF, z >> 4], -1).reshape(n, -1)[:, :blocks].float()
    else:
        zp = torch.full((n, blocks), 8.0)
    w = (q - zp[..., None]) * scales.reshape(n, blocks, 1)
    return w.reshape(n, blocks * block_size)[:, :k]


# --- ONNX translations (torch.onnx custom_translation_table) -------------------------------------------------------
def _quantize_onnx(x, scale, zero_point, lo, hi, clip: bool):
    from onnx_ir import DataType
    from onnxscript import opset21 as op

    if clip:  # b < 8 bits inside uint8: Clip to the b-bit range first
        x = op.Min(op.Max(x, lo), hi)
    zp = op.Cast(zero_point, to=DataType.UINT8)
    return op.QuantizeLinear(x, scale, zp), zp


def _register_contrib_schemas() -> None:
    """Register onnxruntime's contrib-op signatures (com.microsoft, version 1) with onnx's schema registry, which
    the exporter's op builder consults (idempotent; the ONNX package ships no schema for them)."""
    import onnx
    from onnx.defs import OpSchema

    par, opt = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
    floats, ints8 = ["tensor(float)"], ["tensor(uint8)", "tensor(int8)"]
    schemas = {
        "MatMulIntegerToFloat": dict(
            inputs=[
                par("A", "T1"),
                par("B", "T2"),
                par("a_scale", "T3"),
                par("b_scale", "T3"),
                par("a_zero_point", "T1", "", param_option=opt),
                par("b_zero_point", "T2", "", param_option=opt),
                par("bias", "T3", "", param_option=opt),
            ],
            outputs=[par("Y", "T3")],
            type_constraints=[("T1", ints8, ""), ("T2", ints8, ""), ("T3", floats, "")],
        ),
        "MatMulNBits": dict(
            inputs=[
                par("A", "T1"),
                par("B", "T2"),
                par("scales", "T1"),
                par("zero_points", "T3", "", param_option=opt),
                par("g_idx", "T4", "", param_option=opt),
                par("bias", "T1", "", param_option=opt),
            ],
            outputs=[par("Y", "T1")],
            type_constraints=[
                ("T1", floats, ""),
                ("T2", ["tensor(uint8)"], ""),
                ("T3", ["tensor(uint8)", "tensor(float)"], ""),
                ("T4", ["tensor(int32)"], ""),
            ],
            attributes=[OpSchema.Attribute(n, OpSchema.AttrType.INT, "") for n in ("K", "N", "bits", "block_size")]
            + [OpSchema.Attribute("accuracy_level", onnx.helper.make_attribute("accuracy_level", 0), "")],
        ),
    }
    for name, kw in schemas.items():
        try:
            onnx.defs.get_schema(name, 1, "com.microsoft")
        except onnx.defs.SchemaError:
            onnx.defs.register_schema(OpSchema(name, "com.microsoft", 1, **kw))


def _msft():
    from onnxscript.values import Opset

    _register_contrib_schemas()
    return Opset("com.microsoft", 1)


def qlinear_onnx(x, x_scale, x_zp, lo, hi, codes, w_scale, w_zp, bias, clip: bool):
    from onnxscript import opset21 as op

    xq, zp = _quantize_onnx(x, x_scale, x_zp, lo, hi, clip)
    return _msft().MatMulIntegerToFloat(xq, op.Transpose(codes, perm=[1, 0]), x_scale, w_scale, zp, w_zp, bias)


def qconv_onnx(x, x_scale, x_zp, lo, hi, codes, w_scale, w_zp, bias, stride, padding, dilation, groups, clip: bool):
    from onnx_ir import DataType
    from onnxscript import opset21 as op

    xq, zp = _quantize_onnx(x, x_scale, x_zp, lo, hi, clip)
    acc = op.ConvInteger(
        xq, codes, zp, dilations=list(dilation), group=groups, pads=[*padding, *padding], strides=list(stride)
    )
    shape = op.Constant(value_ints=[1, -1, 1, 1])
    y = op.Mul(op.Cast(acc, to=DataType.FLOAT), op.Reshape(op.Mul(x_scale, w_scale), shape))
    return op.Add(y, op.Reshape(bias, shape))


def qmatmul_onnx(a, a_scale, a_zp, b, b_scale, b_zp):
    from onnx_ir import DataType
    from onnxscript import opset21 as op

    za, zb = op.Cast(a_zp, to=DataType.UINT8), op.Cast(b_zp, to=DataType.UINT8)
    qa, qb = op.QuantizeLinear(a, a_scale, za), op.QuantizeLinear(b, b_scale, zb)
    return _msft().MatMulIntegerToFloat(qa, qb, a_scale, b_scale, za, zb)


def gather_rows_onnx(codes, scale, ids):
    from onnx_ir import DataType
    from onnxscript import opset21 as op

    rows = op.Cast(op.Gather(codes, ids, axis=0), to=DataType.FLOAT)
    return op.Mul(rows, op.Unsqueeze(op.Gather(scale, ids, axis=0), op.Constant(value_ints=[-1])))


def matmul_nbits_onnx(x, packed, scales, zero_points, bias, k, n, block_size, accuracy_level):
    return _msft().MatMulNBits(
        x,
        packed,
        scales,
        zero_points,
        None,
        bias,
        K=k,
        N=n,
        bits=4,
        block_size=block_size,
        accuracy_level=accuracy_level,
    )


def translation_table() -> dict:
    return {
        torch.ops.thrifty.qlinear.default: qlinear_onnx,
        torch.ops.thrifty.qconv.default: qconv_onnx,
        torch.ops.thrifty.qmatmul.default: qmatmul_onnx,
        torch.ops.thrifty.gather_rows.default: gather_rows_onnx,
        torch.ops.thrifty.matmul_nbits.default: matmul_nbits_onnx,
    }
