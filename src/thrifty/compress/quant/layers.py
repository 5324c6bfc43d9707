"""Quantized layers (module swap, torchao's calibration style): `QuantLinear`, `QuantConv2d`, `SoftmaxQuant`.

Each keeps its float weight until `pack_()`, so the same module runs quantized or in float (`quant_enabled`),
which QwT needs (the same block with and without quantization). Quantized forward, per output channel c:

    y_c = [ s_w,c * sum_k (W_int - z_w)_ck * Q_a(x)_k + bias_c ]  (* a_c + beta_c if a CWAC is attached)

then, for the q/k/v projections, the output quantizer. `fold_cwac_()` moves a and beta into the per-channel
weight scale and the bias: `s_w,c <- a_c s_w,c`, `bias_c <- a_c bias_c + beta_c` (identical outputs, no extra
parameters). Every quantized layer carries a bias (zeros if the float layer had none) so that beta can be folded.

Block-wise weight scales (`PTQConfig.weight_block_size` = B, <= 4-bit Linear only): codes (N, K) with scales and
zero points (N, K / B), `W_hat[n, k] = (W_int - z)[n, k] * s[n, k // B]` (the MatMulNBits format with block B);
folding a CWAC scales every block of row n: `s[n, :] <- a_n s[n, :]`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from thrifty.compress.quant.quantizers import ActQuantizer, Log2Quantizer, eager
from thrifty.compress.quant.weights import dequantize_weight, search_weight, search_weight_blocks
from thrifty.errors import ConfigError


class QuantModule(nn.Module):
    """Mixin: a module whose quantization can be switched off (`quant_enabled=False` runs it in float).
    `export_int` (set by the ONNX exporter only) routes the forward through the deployment ops of `int_ops`."""

    quant_enabled: bool = True
    export_int: bool = False
    skip_out_qdq: bool = False  # exporter: an 8-bit output whose only consumer re-quantizes it (integer attention)
    qdq_form: bool = False  # conv_output_quant: the conv exports as QDQ that onnxruntime fuses to QLinearConv


class _QuantWeightLayer(QuantModule):
    kind = "?"

    def __init__(self, layer: nn.Module, out_segments: int = 0, observer_samples: int = 2**18):
        super().__init__()
        self.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
        bias = layer.bias.detach().clone() if layer.bias is not None else torch.zeros(layer.weight.shape[0])
        self.bias = nn.Parameter(bias.to(layer.weight), requires_grad=False)
        self.input_quantizer = ActQuantizer(1, observer_samples)
        self.output_quantizer = ActQuantizer(out_segments, observer_samples) if out_segments else None
        self.w_bits, self.weight_symmetric = 8, True
        self.weight_block_size: int | None = None  # block scales (Linear, <= 4 bits); None: per output channel
        self.register_buffer("weight_codes", None)
        self.register_buffer("weight_scale", None)
        self.register_buffer("weight_zero_point", None)
        self.register_buffer("cwac_a", None)
        self.register_buffer("cwac_beta", None)
        self.quant_enabled = True

    # --- state -------------------------------------------------------------------------------------------------
    @property
    def converted(self) -> bool:
        return self.weight_codes is not None

    @property
    def packed(self) -> bool:
        return self.weight is None

    @property
    def a_bits(self) -> int:
        return self.input_quantizer.bits

    def spec(self) -> dict[str, Any]:
        """What `prepare_for_loading` needs to rebuild this layer."""
        block = {"weight_block_size": self.weight_block_size} if self.weight_block_size else {}
        return {
            **block,
            "kind": self.kind,
            "w_bits": self.w_bits,
            "a_bits": self.a_bits,
            "weight_symmetric": self.weight_symmetric,
            "out_segments": self.output_quantizer.segments if self.output_quantizer is not None else 0,
            "out_bits": self.output_quantizer.bits if self.output_quantizer is not None else None,
        }

    def quantize_weight_(
        self,
        bits: int,
        symmetric: bool = True,
        percentiles=None,
        p: float = 2.0,
        half_scales: bool = False,
        block_size: int | None = None,
    ) -> None:
        """Per-channel weight codes and scales (RepQ-ViT's percentile search with L_p error; `half_scales`: scales
        rounded to float16 values, stored exactly in half the bytes by the ONNX export). `block_size` (Linear,
        bits <= 4; ignored otherwise): the same search per block of `block_size` inputs, scales (N, K / B)."""
        kwargs = {} if percentiles is None else {"percentiles": tuple(percentiles)}
        block = self._weight_block(bits, block_size)
        if block:
            codes, scale, zp = search_weight_blocks(
                self.weight.detach(), bits, block, symmetric, p=p, half_scales=half_scales, **kwargs
            )
        else:
            codes, scale, zp = search_weight(
                self.weight.detach(), bits, symmetric, p=p, half_scales=half_scales, **kwargs
            )
        self.w_bits, self.weight_symmetric, self.weight_block_size = int(bits), bool(symmetric), block
        self.weight_codes, self.weight_scale, self.weight_zero_point = codes, scale, zp

    def _weight_block(self, bits: int, block_size: int | None) -> int | None:
        """The block length for this layer's weights, or None (per output channel)."""
        return None

    def empty_like_converted_(self, spec: dict[str, Any]) -> None:
        """Allocate the converted buffers (values come from a state dict): used by `prepare_for_loading`."""
        self.w_bits, self.weight_symmetric = int(spec["w_bits"]), bool(spec["weight_symmetric"])
        self.weight_block_size = self._weight_block(self.w_bits, spec.get("weight_block_size"))
        dtype = torch.int8 if self.weight_symmetric else torch.uint8
        c = self.weight.shape[0]
        shape = (c, self.weight.shape[1] // self.weight_block_size) if self.weight_block_size else (c,)
        self.weight_codes = torch.zeros(self.weight.shape, dtype=dtype)
        self.weight_scale, self.weight_zero_point = torch.ones(shape), torch.zeros(shape, dtype=dtype)
        self.input_quantizer.loaded_(spec["a_bits"])
        if self.output_quantizer is not None:
            self.output_quantizer.loaded_(spec["out_bits"])

    def pack_(self) -> None:
        """Drop the float weight: only codes, scales and bias remain (the deployable form)."""
        if not self.converted:
            raise RuntimeError("pack_() before the weights were quantized; run convert first")
        self.weight = None

    def set_cwac_(self, a: torch.Tensor, beta: torch.Tensor) -> None:
        self.cwac_a, self.cwac_beta = a.detach().float().clone(), beta.detach().float().clone()

    def fold_cwac_(self) -> None:
        """s_w <- a * s_w, bias <- a * bias + beta; the CWAC buffers disappear."""
        if self.cwac_a is None:
            return
        if not self.packed:
            raise RuntimeError("fold_cwac_() needs a packed layer: the float path would see the folded bias")
        with torch.no_grad():
            a = self.cwac_a[:, None] if self.weight_scale.dim() == 2 else self.cwac_a  # every block of row n
            self.weight_scale = self.weight_scale * a
            self.bias.copy_(self.bias * self.cwac_a + self.cwac_beta)
        self.cwac_a, self.cwac_beta = None, None

    def weight_dequantized(self) -> torch.Tensor:
        """(codes - z) * s per output channel (or per block). Eager runs reuse the last result while the codes,
        scale and zero point are the same tensors, unmodified (their version counters): the same values without the
        per-forward unpacking. Traced / exported runs always emit the `dequantize_per_channel` (or
        `dequantize_blocks`) op."""
        codes, scale, zp = self.weight_codes, self.weight_scale, self.weight_zero_point
        if not eager(codes) or any(t.is_inference() for t in (codes, scale, zp)):  # no version counter to check
            return dequantize_weight(codes, scale, zp)
        key = tuple((t, t._version) for t in (codes, scale, zp))
        cached = self.__dict__.get("_dequantized")
        if cached is None or any(a is not b or va != vb for (a, va), (b, vb) in zip(cached[0], key, strict=True)):
            cached = (key, dequantize_weight(codes, scale, zp))
            self.__dict__["_dequantized"] = cached
        return cached[1]

    # --- forward -----------------------------------------------------------------------------------------------
    def _op(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _channel_view(self, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _quant_bias(self) -> torch.Tensor:
        """The bias of the quantized forward (QDQ-form convs: on the int32 grid of s_x s_w, as the engine adds it)."""
        return self.bias

    def _int_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """The deployment op (exporter only), or None where the QDQ form is exported instead."""
        return None

    def _int_args(self, x: torch.Tensor) -> tuple:
        iq = self.input_quantizer
        zp = self.weight_zero_point
        return (
            x,
            iq.scale[0],
            iq.zero_point[0],
            iq.bounds[0, 0],
            iq.bounds[1, 0],
            self.weight_codes,
            self.weight_scale,
            zp,
            self.bias,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        quant = self.quant_enabled and self.converted
        y = self._int_forward(x) if quant and self.export_int else None
        y_int = y is not None
        if y is not None:
            if self.cwac_a is not None:
                y = y * self._channel_view(self.cwac_a) + self._channel_view(self.cwac_beta)
        elif quant:
            y = self._op(self.input_quantizer(x), self.weight_dequantized(), self._quant_bias())
            if self.cwac_a is not None:
                y = y * self._channel_view(self.cwac_a) + self._channel_view(self.cwac_beta)
        else:
            if self.packed:
                raise RuntimeError(
                    "this layer was packed (float weights dropped); float runs need an unpacked copy "
                    "(convert with pack=False)"
                )
            if self.input_quantizer.mode == "observe":
                self.input_quantizer.observe(x)
            y = self._op(x, self.weight, self.bias)
        if self.output_quantizer is not None:
            if quant and not (self.export_int and (self.skip_out_qdq or (self.qdq_form and y_int))):
                y = self.output_quantizer(y)
            elif self.output_quantizer.mode == "observe":
                self.output_quantizer.observe(y)
        return y


class QuantLinear(_QuantWeightLayer):
    """Swap for nn.Linear: weight (out, in), per-output-channel codes; input (..., in) quantized layer-wise."""

    kind = "linear"

    def __init__(self, layer: nn.Linear, out_segments: int = 0, observer_samples: int = 2**18):
        super().__init__(layer, out_segments, observer_samples)
        self.in_features, self.out_features = layer.in_features, layer.out_features

    def _op(self, x, w, b):
        return F.linear(x, w, b)

    def _int_forward(self, x):
        from thrifty.compress.quant.int_ops import matmul_nbits, qlinear

        iq = self.input_quantizer
        nbits = getattr(self, "nbits_packed", None)
        if nbits is not None:  # 4-bit weights: MatMulNBits (float input, QDQ-quantized unless weight-only)
            block, level = self.nbits_config
            return matmul_nbits(
                iq(x),
                nbits,
                self.nbits_scales,
                self.nbits_zero_points,
                self.bias,
                self.in_features,
                self.out_features,
                block,
                level,
            )
        if iq.mode != "quant" or iq.segments != 1 or self.weight_block_size:
            return None
        return qlinear(*self._int_args(x), iq.bits < 8)

    def _channel_view(self, v):
        return v

    def _weight_block(self, bits, block_size):
        if block_size is None or bits > 4:
            return None
        k = self.in_features
        if block_size < 16 or block_size & (block_size - 1) or k % block_size:
            raise ConfigError(
                f"{getattr(self, '_thrifty_name', 'a Linear layer')}: weight_block_size={block_size} must be a "
                f"power of 2 >= 16 dividing in_features={k}; pick one that divides it (e.g. "
                f"{k & -k if k & -k >= 16 else 'none exists'}) or weight_block_size=None"
            )
        return int(block_size)


class QuantConv2d(_QuantWeightLayer):
    """Swap for nn.Conv2d (and EfficientNet's static-same-padding subclass, whose pad module it keeps)."""

    kind = "conv2d"

    def __init__(self, layer: nn.Conv2d, out_segments: int = 0, observer_samples: int = 2**18):
        super().__init__(layer, out_segments, observer_samples)
        pad = getattr(layer, "static_padding", None)
        self.pad = pad if isinstance(pad, nn.Module) else nn.Identity()
        self.stride, self.padding = tuple(layer.stride), layer.padding
        self.dilation, self.groups = tuple(layer.dilation), layer.groups
        self.in_channels, self.out_channels = layer.in_channels, layer.out_channels
        self.input_shared = False  # qdq_form: the input is already quantized by this quantizer (a stream tensor)

    def spec(self) -> dict[str, Any]:
        s = super().spec()
        if self.qdq_form:
            s["qdq_form"], s["input_shared"] = True, bool(self.input_shared)
        return s

    def empty_like_converted_(self, spec: dict[str, Any]) -> None:
        super().empty_like_converted_(spec)
        self.qdq_form, self.input_shared = bool(spec.get("qdq_form", False)), bool(spec.get("input_shared", False))

    def _quant_bias(self) -> torch.Tensor:
        if not self.qdq_form:
            return self.bias
        from thrifty.compress.quant.conv_qdq import quant_bias

        return quant_bias(self)

    def _op(self, x, w, b):
        return F.conv2d(self.pad(x), w, b, self.stride, self.padding, self.dilation, self.groups)

    def _int_forward(self, x):
        from thrifty.compress.quant.int_ops import qconv

        iq = self.input_quantizer
        if (
            self.qdq_form
            and iq.mode == "quant"
            and self.cwac_a is None
            and getattr(self, "bias_codes", None) is not None
        ):
            from thrifty.compress.quant.conv_qdq import qdq_forward

            return qdq_forward(self, x)  # Q/DQ around Conv: onnxruntime fuses it to QLinearConv
        if iq.mode != "quant" or self.w_bits <= 4 or not self.weight_symmetric or isinstance(self.padding, str):
            return None  # 4-bit conv: DequantizeLinear(int4) + Conv; asymmetric or "same" padding: QDQ
        return qconv(  # the zero padding of self.pad quantizes to the zero point, as ConvInteger's own padding
            *self._int_args(self.pad(x)),
            list(self.stride),
            list(self.padding),
            list(self.dilation),
            self.groups,
            iq.bits < 8,
        )

    def _channel_view(self, v):
        return v.view(1, -1, 1, 1)


def supported_conv(module: nn.Module) -> bool:
    """Plain zero-padded Conv2d, or a subclass whose only change is a `static_padding` module (EfficientNet)."""
    if not isinstance(module, nn.Conv2d) or module.padding_mode != "zeros":
        return False
    return type(module).forward is nn.Conv2d.forward or isinstance(getattr(module, "static_padding", None), nn.Module)


class SoftmaxQuant(QuantModule):
    """Quantizes attention probabilities after `inner` (timm's attn_drop, identity at eval)."""

    def __init__(self, inner: nn.Module | None = None, log2: bool = True, observer_samples: int = 2**18):
        super().__init__()
        self.inner = inner if inner is not None else nn.Identity()
        self.log2 = bool(log2)
        self.quantizer = Log2Quantizer(1, observer_samples) if log2 else ActQuantizer(1, observer_samples)
        self.quant_enabled = True

    def spec(self) -> dict[str, Any]:
        return {"kind": "softmax", "a_bits": self.quantizer.bits, "log2": self.log2}

    pv_integer: bool = False  # set by the exporter from `integer_pv()` (no data-dependent check while tracing)

    def integer_pv(self) -> bool:
        """Uniform uint8 probabilities with zero point 0 in quant mode: P x V can run on integer kernels."""
        q = self.quantizer
        return not self.log2 and q.mode == "quant" and int(q.zero_point[0]) == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inner(x)
        q = self.quantizer
        if self.quant_enabled and q.mode == "quant":
            return q(x)
        if q.mode == "observe":
            q.observe(x)
        return x


def quant_modules(root: nn.Module) -> Iterator[tuple[str, QuantModule]]:
    for name, m in root.named_modules():
        if isinstance(m, QuantModule):
            yield name, m


def set_quant_state(root: nn.Module, enabled: bool) -> None:
    """Switch every quantized module under `root` on (quantized) or off (float)."""
    for _, m in quant_modules(root):
        m.quant_enabled = bool(enabled)


@contextmanager
def quant_state(root: nn.Module, enabled: bool):
    """Temporarily run `root` quantized (True) or in float (False); restores each module's flag."""
    saved = [(m, m.quant_enabled) for _, m in quant_modules(root)]
    set_quant_state(root, enabled)
    try:
        yield root
    finally:
        for m, flag in saved:
            m.quant_enabled = flag
