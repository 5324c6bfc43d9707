"""ONNX export of a converted model: the deployment graph onnxruntime runs on integer kernels (`int_kernels=True`,
the default) or the plain QDQ graph (`int_kernels=False`).

Deployment graph (thrifty.compress.quant.int_ops; each op's eager forward is the PyTorch simulation):
- Linear with >= 5-bit weights: `QuantizeLinear` (uint8 activation, zero point) + `MatMulIntegerToFloat` on the
  int8 weight codes (u8s8, per-output-channel weight scales, bias): a folded CWAC is just other scales and biases;
- Conv2d: `QuantizeLinear` + `ConvInteger` + `Cast` + `Mul` (s_x s_w per channel) + `Add` (bias); with
  `PTQConfig(conv_output_quant=True)` instead QDQ around every Conv with its output quantized (int32 bias), which
  onnxruntime fuses to `QLinearConv` / `QLinearAdd` (thrifty.compress.quant.conv_qdq);
- attention (Hugging Face encoders): Q K^T from the quantized q and k, and P V from uniform uint8 probabilities
  (`softmax_quantizer="uniform"`) and the quantized v, as `MatMulIntegerToFloat` on uint8 x uint8;
- embeddings: `Gather` on the int8 table and on the row scales, `Cast`, `Mul`; <= 4-bit tables with block scales:
  `com.microsoft.GatherBlockQuantized` on an INT4 table (thrifty.compress.quant.embedding);
- Linear with <= 4-bit weights: `com.microsoft.MatMulNBits` (block-wise uint4 codes with zero point 8, every block
  of a row carries the row's folded scale, so the block is as long as K allows: `nbits_block`; with
  `PTQConfig.weight_block_size` the layer's own block scales, block = weight_block_size), its input
  `QuantizeLinear` -> `DequantizeLinear` unless weight-only (a_bits=16); `accuracy_level=0` computes in float on
  the dequantized weights: exactly the simulation;
- <= 4-bit Conv2d weights are stored as ONNX INT4 initializers for `DequantizeLinear` (no int4 conv kernel).
What has no integer form stays QDQ / float: the log2 softmax quantizer (Log / Round / Clip / Pow / Where), the
q | k | v segments of a fused timm qkv (timm's attention matmuls are its own code), QwT's float16 branch,
LayerNorm, GELU, softmax. Widths below 8 bits add a `Clip` to the b-bit range before `QuantizeLinear`: exact
b-bit quantization inside 8-bit containers. `finalize_onnx_` then applies thrifty.compress.quant.onnx_compact's
lossless size reductions (metadata, value_info, float16-exact scales, short names).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from thrifty.errors import ConfigError


def _dequantize_onnx(codes, scale, zero_point):
    from onnxscript import opset21 as op

    return op.DequantizeLinear(codes, scale, zero_point, axis=0)


def _dequantize_blocks_onnx(codes, scale, zero_point):
    from onnxscript import opset21 as op

    # blocked DequantizeLinear (opset 21): block length from the static shapes, K / number of scales per row
    return op.DequantizeLinear(codes, scale, zero_point, axis=1, block_size=codes.shape[1] // scale.shape[1])


def _fake_quant_onnx(x, scale, zero_point, lo, hi, axis: int):
    from onnx_ir import DataType
    from onnxscript import opset21 as op

    x = op.Min(op.Max(x, lo), hi)
    zp = op.Cast(zero_point, to=DataType.UINT8)
    if axis < 0:
        return op.DequantizeLinear(op.QuantizeLinear(x, scale, zp), scale, zp)
    return op.DequantizeLinear(op.QuantizeLinear(x, scale, zp, axis=axis), scale, zp, axis=axis)


def nbits_block(k: int, block_size: int | None = None, largest: int = 512) -> int:
    """MatMulNBits' block length for K inputs: `block_size` when given, else the largest power of 2 in
    [16, largest] dividing K (no padding, fewest repeated per-channel scales: 128 for K = 384, 512 for 1536),
    32 when none divides K."""
    if block_size is not None:
        return block_size
    b = largest
    while b >= 16 and k % b:
        b //= 2
    return b if b >= 16 else 32


@contextmanager
def export_mode(model: nn.Module, int_kernels: bool = True, block_size: int | None = None, accuracy_level: int = 0):
    """Compensation branches emit real float16 ops while exporting; with `int_kernels` the quantized modules emit
    the deployment ops and <= 4-bit linear layers carry their MatMulNBits blobs (temporary buffers)."""
    from thrifty.compress.quant import conv_qdq
    from thrifty.compress.quant.int_ops import pack_nbits
    from thrifty.compress.quant.layers import QuantLinear, QuantModule, SoftmaxQuant

    comps = [m for m in model.modules() if hasattr(m, "export_half")]
    quants = [m for m in model.modules() if isinstance(m, QuantModule)] if int_kernels else []
    nbits = [m for m in quants if isinstance(m, QuantLinear) and m.converted and m.w_bits <= 4]
    for m in comps:
        m.export_half = True
    for m in quants:
        m.export_int = True
        if isinstance(m, SoftmaxQuant):
            m.pv_integer = m.integer_pv()
    skipped = _skip_requantized_outputs(model) if int_kernels else []
    qdq_convs = conv_qdq.begin_export(model) if int_kernels else []
    for m in nbits:
        block = m.weight_block_size or nbits_block(m.in_features, block_size)
        if m.weight_block_size and block_size is not None and block_size != m.weight_block_size:
            raise ConfigError(
                f"export block_size={block_size} differs from the weights' block scales (weight_block_size="
                f"{m.weight_block_size}); export with block_size=None"
            )
        blobs = pack_nbits(m.weight_codes, m.weight_scale, m.weight_zero_point, m.weight_symmetric, block)
        for name, t in zip(("nbits_packed", "nbits_scales", "nbits_zero_points"), blobs, strict=True):
            m.register_buffer(name, t, persistent=False)
        m.nbits_config = (block, accuracy_level)
    try:
        yield model
    finally:
        for m in comps:
            m.export_half = False
        for m in quants:
            m.export_int = False
        for m in skipped:
            m.skip_out_qdq = False
        conv_qdq.end_export(qdq_convs)
        for m in nbits:
            for name in ("nbits_packed", "nbits_scales", "nbits_zero_points"):
                delattr(m, name)
            del m.nbits_config


def _skip_requantized_outputs(model: nn.Module) -> list[nn.Module]:
    """8-bit q / k (/ v with integer P V) projection outputs of Hugging Face attention feed only `qmatmul`, whose
    QuantizeLinear gives the same codes (8-bit saturation is the quantizer's clamp): their Q/DQ pair is dropped."""
    skipped = []
    for attn in model.modules():
        sq = getattr(attn, "thrifty_softmax_quant", None)
        if sq is None:
            continue
        names = ("query", "key", "value") if sq.pv_integer else ("query", "key")
        layers = [getattr(attn, n, None) for n in names]
        outs = [getattr(m, "output_quantizer", None) for m in layers]
        if any(q is None or q.mode != "quant" or q.segments != 1 or q.bits != 8 for q in outs[:2]):
            continue
        for m, q in zip(layers, outs, strict=True):
            if q is not None and q.mode == "quant" and q.segments == 1 and q.bits == 8:
                m.skip_out_qdq = True
                skipped.append(m)
    return skipped


def export_onnx(
    model: nn.Module,
    path: str,
    example_inputs: Any,
    opset: int = 21,
    optimize: bool = False,
    int_kernels: bool = True,
    block_size: int | None = None,
    accuracy_level: int = 0,
    compact: bool = True,
) -> str:
    """Export `model` (a converted, packed quantized model) with a dynamic batch axis; returns `path`.
    `int_kernels`: the deployment graph (else plain QDQ); `block_size` (None: `nbits_block`), `accuracy_level`:
    MatMulNBits'; `compact`: onnx_compact's size reductions (short names, float16-exact scales)."""
    from thrifty.compress.onnx_graph import export_graph
    from thrifty.compress.quant import embedding
    from thrifty.compress.quant.conv_qdq import translation_table as conv_qdq_table
    from thrifty.compress.quant.int_ops import translation_table

    model = model.eval()
    table = {
        torch.ops.thrifty.dequantize_per_channel.default: _dequantize_onnx,
        torch.ops.thrifty.dequantize_blocks.default: _dequantize_blocks_onnx,
        torch.ops.thrifty.fake_quant_uint8.default: _fake_quant_onnx,
        **translation_table(),
        **conv_qdq_table(),
        **embedding.translation_table(),
    }
    keys = ["input_ids", "attention_mask"] if isinstance(example_inputs, dict) else None
    with export_mode(model, int_kernels, block_size, accuracy_level):
        export_graph(
            model, path, example_inputs, opset=opset, keys=keys, max_batch=4096, table=table, optimize=optimize
        )
    finalize_onnx_(path, int4=int_kernels, compact=compact)
    return path


def finalize_onnx_(path: str, int4: bool = True, compact: bool = True) -> None:
    """Drop the exporter's per-node metadata (stack traces, name scopes: ~3 KB a node, 2.2 MB on MiniLM), with
    `int4` store <= 4-bit DequantizeLinear weights as INT4 (`int4_initializers_`), turn constant Clip bounds into
    initializers (conv_qdq.fold_clip_bounds_: onnxruntime drops a redundant Clip only then), onnx_compact.compact_onnx_
    (`compact=False`: without float16 storage and short names); rewrites `path` atomically."""
    import onnx

    from thrifty.compress.quant.conv_qdq import fold_clip_bounds_
    from thrifty.compress.quant.onnx_compact import compact_onnx_

    model = onnx.load(path)
    if int4:
        int4_initializers_(model)
    fold_clip_bounds_(model)
    compact_onnx_(model, half=compact, short_names=compact)
    tmp = f"{path}.tmp"
    onnx.save(model, tmp)
    os.replace(tmp, path)


def int4_initializers_(model) -> int:
    """Store int8 `DequantizeLinear` inputs whose codes (and zero points) all fit [-8, 7] as ONNX INT4 (lossless:
    the <= 4-bit conv weights, half the bytes), in place in the ModelProto; returns how many were converted."""
    import onnx
    from onnx import numpy_helper

    from thrifty.compress.quant.onnx_compact import int4_tensor

    inits = {t.name: t for t in model.graph.initializer}
    done = 0
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) < 3:
            continue
        codes, zp = inits.get(node.input[0]), inits.get(node.input[2])
        if codes is None or zp is None or codes.data_type != onnx.TensorProto.INT8 or codes.data_type != zp.data_type:
            continue
        arrays = [numpy_helper.to_array(t) for t in (codes, zp)]
        if any(a.size and (a.min() < -8 or a.max() > 7) for a in arrays) or arrays[0].size < 64:
            continue
        for t, a in zip((codes, zp), arrays, strict=True):
            t.CopyFrom(int4_tensor(t.name, a))
        done += 1
    return done


def ort_session(path: str, threads: int | None = None, spinning: bool = True):
    """A CPU onnxruntime session; `threads` intra-op threads (one inter-op), `spinning=False` for fair interleaved
    timing (idle threads sleep instead of spinning)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def ort_feed(inputs: Any, names: Any = None) -> dict[str, np.ndarray]:
    """onnxruntime inputs: the dict entries the graph reads by name (text: input_ids, attention_mask, and
    token_type_ids where the graph has it; CTR tables: one int64 input per field), or an image batch under the
    graph's single input name (default "x")."""
    if isinstance(inputs, dict):
        wanted = list(names) if names else ["input_ids", "attention_mask"]
        feed = {k: v.cpu().numpy().astype(np.int64) for k, v in inputs.items() if k in wanted}
        if "token_type_ids" in wanted and "token_type_ids" not in feed and "input_ids" in feed:
            feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
        return feed
    return {(next(iter(names)) if names else "x"): inputs.cpu().numpy().astype(np.float32)}


def ort_logits(session, inputs: Any) -> torch.Tensor:
    """The first output (logits) for a thrifty batch."""
    return torch.from_numpy(session.run(None, ort_feed(inputs, [i.name for i in session.get_inputs()]))[0])


def evaluate_onnx(
    path: str, dataset, batch_size: int = 64, threads: int | None = None, objective: str | None = None
) -> dict[str, float]:
    """Top-1 accuracy of an ONNX classifier (any exporter: thrifty's, onnxruntime's quantizers, a float export) on a
    thrifty dataset; inputs are matched by name, the first output is the logits. With another `objective` (e.g.
    "binary": AUC, log loss) its meters instead."""
    from torch.utils.data import DataLoader

    sess = ort_session(path, threads)
    if objective not in (None, "classification"):
        from thrifty.objectives import make_objective

        meter = make_objective(objective).meter()
        for inputs, labels in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            meter.update(ort_logits(sess, inputs), labels)
        return meter.compute()
    correct = total = 0
    loss = 0.0
    for inputs, labels in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        logits = ort_logits(sess, inputs)
        loss += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(-1) == labels).sum())
        total += len(labels)
    return {"accuracy": correct / max(1, total), "loss": loss / max(1, total), "samples": total}


def median_latency(fn: Callable[[], Any], repeats: int = 10, warmup: int = 2) -> float:
    """Median wall time (seconds) of `fn()`."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))
