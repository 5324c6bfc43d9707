"""Conv export that onnxruntime fuses to `QLinearConv` / `QLinearAdd` (`PTQConfig(conv_output_quant=True)`).

onnxruntime's QDQ fusion (core/optimizer/qdq_transformer, ConvNodeGroupSelector / binary Add selector) turns

    DequantizeLinear(x: uint8) -> Conv(DQ(W: int8, per channel), DQ(bias: int32, scale s_x s_w)) -> QuantizeLinear

into one `QLinearConv` (u8s8, requantized output), and `DQ(a), DQ(b) -> Add -> Q` into `QLinearAdd`. It needs the
conv OUTPUT quantized (a single QuantizeLinear consumer, a Clip / Relu in between only when the quantizer's range
makes it redundant: uint8, zero point 0, 255 s <= 6 for ReLU6), the bias on the int32 grid of s_x s_w, and every
input of an Add coming from a DequantizeLinear. This module places the quantizers so that every conv output is
quantized exactly once, by the quantizer of what consumes it:

- conv -> (folded BN) -> act -> quantized conv: the consumer's input quantizer (calibrated on the activation's
  output: for ReLU6 its range is within [0, 6] with zero point 0, so the Clip is absorbed; a range whose 255 s
  rounds above 6 in float32 is nudged down by ulps so that the engine sees it as redundant);
- block boundaries of a CNN Backbone (the residual stream): a `StreamQuant` on every block input and on the last
  block's output; convs that read the block input share its quantizer (no second QDQ), the residual Add reads it;
- any other conv output (a residual branch's projection before the Add, the head conv before global pooling): an
  output quantizer of its own, calibrated after the activation module that follows it (if one does).

Simulation (PyTorch) and engine compute the same: uint8 Q with round half to even, int8 symmetric per-channel
weights, bias b_hat = round(b / (s_x s_w)) s_x s_w (the int32 grid), output y_q = Q_out(conv + b_hat); the engine's
requantization differs only in the float rounding of the int32 accumulator times s_x s_w / s_y (ties at .5 LSB).
The data flow is found with tensor tags during calibration (module hooks: conv -> BatchNorm -> ReLU/ReLU6/Hardtanh
-> consumer); a consumer that is not a module (a functional clamp, an add) is covered by the stream quantizers or
the conv's own output quantizer. A conv whose output also reaches an unquantized consumer stays a float Conv
between QDQ pairs in the engine (correct, not fused). 8-bit activations only.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from thrifty.compress.quant.layers import QuantConv2d, QuantModule
from thrifty.compress.quant.quantizers import ActQuantizer, fake_quant
from thrifty.compress.quant.weights import dequantize_per_channel


ACTS = (nn.ReLU, nn.ReLU6, nn.Hardtanh)
_TAG = "_thrifty_cq"  # on a tensor: (conv, act bounds or None)
_STREAM = "_thrifty_cq_stream"  # on a tensor: the StreamQuant that produced it


# --- ops ----------------------------------------------------------------------------------------------------------
@torch.library.custom_op("thrifty::qdq_u8", mutates_args=())
def qdq_u8(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """uint8 QuantizeLinear -> DequantizeLinear (per tensor, 0-d qparams): (sat(rne(x / s) + z) - z) s."""
    z = zero_point.to(x.dtype)
    return (torch.clamp(torch.round(x / scale) + z, 0, 255) - z) * scale


@qdq_u8.register_fake
def _(x, scale, zero_point):
    return torch.empty_like(x)


@torch.library.custom_op("thrifty::dequantize_bias", mutates_args=())
def dequantize_bias(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int32 bias codes (C,) * scale (C,) (DequantizeLinear, zero point 0)."""
    return codes.float() * scale


@dequantize_bias.register_fake
def _(codes, scale):
    return torch.empty(codes.shape, dtype=torch.float32)


def qdq_u8_onnx(x, scale, zero_point):
    from onnx_ir import DataType
    from onnxscript import opset21 as op

    zp = op.Cast(zero_point, to=DataType.UINT8)
    return op.DequantizeLinear(op.QuantizeLinear(x, scale, zp), scale, zp)


def dequantize_bias_onnx(codes, scale):
    from onnxscript import opset21 as op

    return op.DequantizeLinear(codes, scale, axis=0)


def translation_table() -> dict:
    return {
        torch.ops.thrifty.qdq_u8.default: qdq_u8_onnx,
        torch.ops.thrifty.dequantize_bias.default: dequantize_bias_onnx,
    }


def bias_grid(layer: QuantConv2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(int32 codes round(b / (s_x s_w)), scale s_x s_w) of a conv's bias (QLinearConv's bias format)."""
    scale = (layer.input_quantizer.scale[0] * layer.weight_scale).float()
    codes = torch.round(layer.bias.detach().float() / scale).clamp(-(2**31), 2**31 - 1).to(torch.int32)
    return codes, scale


def quant_bias(layer: QuantConv2d) -> torch.Tensor:
    """The bias the engine adds: int32 codes times s_x s_w (float32)."""
    codes, scale = bias_grid(layer)
    return codes.float() * scale


def qdq_forward(layer: QuantConv2d, x: torch.Tensor) -> torch.Tensor:
    """The export form: [Q -> DQ] -> Pad -> Conv(DQ(W), DQ(int32 bias)) -> [Q -> DQ]."""
    iq = layer.input_quantizer
    if not layer.input_shared:
        x = qdq_u8(x, iq.scale[0], iq.zero_point[0])
    w = dequantize_per_channel(layer.weight_codes, layer.weight_scale, layer.weight_zero_point)
    b = dequantize_bias(layer.bias_codes, layer.bias_scale)
    y = torch.nn.functional.conv2d(layer.pad(x), w, b, layer.stride, layer.padding, layer.dilation, layer.groups)
    oq = layer.output_quantizer
    if oq is not None:
        y = qdq_u8(y, oq.scale[0], oq.zero_point[0])
    return y


# --- stream quantizers -------------------------------------------------------------------------------------------
class StreamQuant(QuantModule):
    """Quantizes a residual-stream tensor (a CNN block's input, the last block's output): uint8 per tensor."""

    def __init__(self, observer_samples: int = 2**17):
        super().__init__()
        self.quantizer = ActQuantizer(1, observer_samples)
        self.quantizer.mode = "observe"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.quantizer
        if q.mode == "observe":
            q.observe(x)
            x.__dict__[_STREAM] = self
            return x
        if not self.quant_enabled or q.mode != "quant":
            return x
        if self.export_int:
            return qdq_u8(x, q.scale[0], q.zero_point[0])
        return fake_quant(x, q.scale[0], q.zero_point[0], q.bounds[0, 0], q.bounds[1, 0], -1)


def _stream_in_hook(block: nn.Module, args: tuple) -> tuple | None:
    if not args:
        return None
    return (block.thrifty_stream_in(args[0]), *args[1:])


def _stream_out_hook(block: nn.Module, args: tuple, output: Any) -> Any:
    return block.thrifty_stream_out(output)


def _cnn_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from thrifty.backbones import Backbone

    bb = model if isinstance(model, Backbone) else getattr(model, "backbone", None)
    if not isinstance(bb, Backbone) or getattr(bb, "kind", None) != "cnn":
        return []
    ids = {id(b): i for i, b in enumerate(bb.blocks)}
    return sorted(((n, m) for n, m in model.named_modules() if id(m) in ids), key=lambda nm: ids[id(nm[1])])


def attach_streams_(model: nn.Module, names_out: tuple[list[str], str | None], observer_samples: int = 2**17):
    """StreamQuant on the inputs of the named blocks (and the output of `last`), with their hooks."""
    ins, last = names_out
    for name in ins:
        blk = model.get_submodule(name)
        blk.thrifty_stream_in = StreamQuant(observer_samples)
        blk.register_forward_pre_hook(_stream_in_hook)
    if last is not None:
        blk = model.get_submodule(last)
        blk.thrifty_stream_out = StreamQuant(observer_samples)
        blk.register_forward_hook(_stream_out_hook)


# --- calibration-time data flow ------------------------------------------------------------------------------------
def _conv_out_hook(conv: nn.Module, args: tuple, out: Any) -> None:
    if isinstance(out, torch.Tensor) and conv.input_quantizer.mode == "observe":
        conv._cq["raw"].observe(out)
        out.__dict__[_TAG] = (conv, None)


def _conv_in_hook(conv: nn.Module, args: tuple) -> None:
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor) or conv.input_quantizer.mode != "observe":
        return
    stream = x.__dict__.get(_STREAM)
    if stream is not None:
        conv._cq["reads_stream"] = stream
    tag = x.__dict__.get(_TAG)
    if tag is not None:
        tag[0]._cq["feeds"].add("conv")
        if tag[1] is not None:
            conv._cq["after_act"] = tag[1]


def _stream_tag_hook(module: nn.Module, args: tuple) -> None:
    x = args[0] if args else None
    tag = x.__dict__.get(_TAG) if isinstance(x, torch.Tensor) else None
    if tag is not None and module.quantizer.mode == "observe":
        tag[0]._cq["feeds"].add("stream")
        if tag[1] is not None:
            module._cq_after_act = tag[1]


def _pass_hook(module: nn.Module, args: tuple, out: Any) -> None:
    """BatchNorm (to be folded) keeps the tag; an activation records its bounds and feeds the post-act observer."""
    x = args[0] if args else None
    tag = x.__dict__.get(_TAG) if isinstance(x, torch.Tensor) else None
    if tag is None or not isinstance(out, torch.Tensor) or (tag[1] is not None and not isinstance(module, ACTS)):
        return
    if isinstance(module, nn.BatchNorm2d):
        out.__dict__[_TAG] = tag
        return
    bounds = _act_bounds(module)
    conv = tag[0]
    conv._cq["act"] = bounds
    conv._cq["post"].observe(out)
    out.__dict__[_TAG] = (conv, bounds)


def _act_bounds(m: nn.Module) -> tuple[float, float]:
    if isinstance(m, nn.Hardtanh):  # ReLU6 is a Hardtanh(0, 6)
        return float(m.min_val), float(m.max_val)
    return 0.0, float("inf")


_HOOKS = (_conv_out_hook, _conv_in_hook, _stream_tag_hook, _pass_hook)


def prepare_conv_qdq_(model: nn.Module, observer_samples: int) -> None:
    """Stream quantizers on the CNN blocks, output observers and data-flow hooks on the quantized convs."""
    blocks = _cnn_blocks(model)
    attach_streams_(model, ([n for n, _ in blocks], blocks[-1][0] if blocks else None), observer_samples)
    for m in model.modules():
        if isinstance(m, StreamQuant):
            m.register_forward_pre_hook(_stream_tag_hook)
        elif isinstance(m, QuantConv2d):
            m.__dict__["_cq"] = {
                "raw": ActQuantizer(1, observer_samples),
                "post": ActQuantizer(1, observer_samples),
                "feeds": set(),
            }
            m.register_forward_pre_hook(_conv_in_hook)
            m.register_forward_hook(_conv_out_hook)
        elif isinstance(m, (nn.BatchNorm2d, *ACTS)):
            m.register_forward_hook(_pass_hook)


def _remove_hooks(model: nn.Module) -> None:
    for m in model.modules():
        for hooks in (m._forward_pre_hooks, m._forward_hooks):
            for key in [k for k, fn in hooks.items() if fn in _HOOKS]:
                del hooks[key]


def _absorb_act_(q: ActQuantizer, bounds: tuple[float, float] | None) -> bool:
    """Whether the quantizer's range [(0 - z) s, (255 - z) s] lies inside the activation's bounds (the engine then
    drops the Clip / Relu); a float32 255 s a few ulps above the upper bound is nudged down to it."""
    if bounds is None or q.mode != "quant" or int(q.zero_point[0]) != 0 or bounds[0] > 0:
        return False
    s = np.float32(q.scale[0])
    hi = np.float32(bounds[1])
    for _ in range(8):
        if np.float32(s * np.float32(255)) <= hi:
            break
        s = np.nextafter(s, np.float32(0))
    if np.float32(s * np.float32(255)) > hi:
        return False
    q.set_qparams(torch.tensor([float(s)]), q.zero_point.float())
    return True


def convert_conv_qdq_(model: nn.Module, config) -> dict[str, Any]:
    """After the PTQ ranges: calibrate the streams, share / add conv quantizers; returns the spec entry."""
    _remove_hooks(model)
    streams = {}
    for name, m in model.named_modules():
        if isinstance(m, StreamQuant):
            if not m.quantizer.observed:
                raise RuntimeError(f"stream quantizer {name} saw no data during calibration")
            m.quantizer.calibrate(8, config.percentiles, config.lp_norm)
            m.quantizer.drop_observations()
            _absorb_act_(m.quantizer, getattr(m, "_cq_after_act", None))
            m.__dict__.pop("_cq_after_act", None)
            streams[name] = m
    layers, absorbed = {}, 0
    for name, m in model.named_modules():
        if not isinstance(m, QuantConv2d) or "_cq" not in m.__dict__:
            continue
        cq = m.__dict__.pop("_cq")
        stream = cq.get("reads_stream")
        if stream is not None:  # the block's input quantizer is this conv's
            m.input_quantizer.set_qparams(stream.quantizer.scale.clone(), stream.quantizer.zero_point.float())
            m.input_shared = True
        elif cq.get("after_act") is not None:
            absorbed += _absorb_act_(m.input_quantizer, cq["after_act"])
        if not cq["feeds"] and m.converted:  # nothing quantizes this conv's output: it gets its own quantizer
            obs = cq["post"] if "act" in cq else cq["raw"]
            obs.calibrate(8, config.percentiles, config.lp_norm)
            obs.drop_observations()
            absorbed += _absorb_act_(obs, cq.get("act"))
            m.output_quantizer = obs
        m.qdq_form = True
        layers[name] = {"input_shared": m.input_shared, "output_quant": m.output_quantizer is not None}
    return {"streams": sorted(streams), "layers": layers, "absorbed_activations": absorbed}


def restore_conv_qdq_(model: nn.Module, spec: dict[str, Any]) -> None:
    """Rebuild the stream quantizers and conv flags of a saved model (values come from the state dict)."""
    names = spec["streams"]
    ins = [n.rsplit(".", 1)[0] for n in names if n.endswith("thrifty_stream_in")]
    outs = [n.rsplit(".", 1)[0] for n in names if n.endswith("thrifty_stream_out")]
    attach_streams_(model, (ins, outs[0] if outs else None))
    for n in names:
        model.get_submodule(n).quantizer.loaded_(8)
    for name, s in spec["layers"].items():
        m = model.get_submodule(name)
        m.qdq_form, m.input_shared = True, bool(s["input_shared"])


# --- export ----------------------------------------------------------------------------------------------------
def begin_export(model: nn.Module) -> list[QuantConv2d]:
    """Temporary int32 bias buffers on the QDQ-form convs (restored by `end_export`)."""
    done = []
    for m in model.modules():
        if isinstance(m, QuantConv2d) and m.qdq_form and m.converted:
            codes, scale = bias_grid(m)
            m.register_buffer("bias_codes", codes, persistent=False)
            m.register_buffer("bias_scale", scale, persistent=False)
            done.append(m)
    return done


def end_export(layers: list[QuantConv2d]) -> None:
    for m in layers:
        del m.bias_codes, m.bias_scale


def fold_clip_bounds_(model) -> int:
    """Clip bounds computed from constants (the exporter's Constant -> CastLike) as float initializers, in place in
    the ModelProto: onnxruntime's ClipQuantFusion drops only a Clip with initializer bounds. Returns the count."""
    from onnx import helper, numpy_helper

    consts = {}
    for n in model.graph.node:
        if n.op_type == "Constant" and len(n.output) == 1 and len(n.attribute) == 1:
            a = n.attribute[0]
            value = numpy_helper.to_array(a.t) if a.name == "value" else helper.get_attribute_value(a)
            consts[n.output[0]] = np.asarray(value)
    casts = {
        n.output[0]: consts[n.input[0]].astype(np.float32)
        for n in model.graph.node
        if n.op_type in ("Cast", "CastLike") and n.input and n.input[0] in consts
    }
    done = 0
    for n in model.graph.node:
        for i in (1, 2):
            if n.op_type == "Clip" and len(n.input) > i and n.input[i] in casts:
                new = f"{n.input[i]}_folded"
                if new not in {t.name for t in model.graph.initializer}:
                    model.graph.initializer.append(numpy_helper.from_array(casts[n.input[i]], new))
                n.input[i] = new
                done += 1
    for _ in range(2):  # drop the casts, then the constants, left without consumers
        used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
        keep = [
            n
            for n in model.graph.node
            if n.op_type not in ("Cast", "CastLike", "Constant") or any(o in used for o in n.output)
        ]
        del model.graph.node[:]
        model.graph.node.extend(keep)
    return done
