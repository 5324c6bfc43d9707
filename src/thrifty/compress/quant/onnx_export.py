"""ONNX export of a converted model as a QDQ graph that runs in onnxruntime.

- weights: int8/uint8 code initializers + `DequantizeLinear` per output channel (axis 0); a folded CWAC is just
  different scales and biases in these nodes, so QwT-v2's graph is the plain PTQ graph with other numbers;
- activations: `QuantizeLinear` -> `DequantizeLinear` (uint8; per segment for q | k | v). Widths below 8 bits
  add a `Clip` to the b-bit range first: exact b-bit fake quantization inside int8 containers, since engines
  have no int4/int6 activation kernels;
- post-softmax log2 quantization: Log / Round / Clip / Pow / Where (no QDQ form exists);
- QwT's branch: a float16 MatMul (or grouped Conv) on fp16 weights, cast back to float32.

onnxruntime's CPU provider executes QDQ pairs as they are unless a QDQ -> integer-kernel fusion applies (it
needs quantized outputs too), so CPU latencies compare graphs, not int8 kernels.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn


def _dequantize_onnx(codes, scale, zero_point):
    from onnxscript import opset21 as op

    return op.DequantizeLinear(codes, scale, zero_point, axis=0)


def _fake_quant_onnx(x, scale, zero_point, lo, hi, axis: int):
    from onnx_ir import DataType
    from onnxscript import opset21 as op

    x = op.Min(op.Max(x, lo), hi)
    zp = op.Cast(zero_point, to=DataType.UINT8)
    if axis < 0:
        return op.DequantizeLinear(op.QuantizeLinear(x, scale, zp), scale, zp)
    return op.DequantizeLinear(op.QuantizeLinear(x, scale, zp, axis=axis), scale, zp, axis=axis)


@contextmanager
def export_mode(model: nn.Module):
    """Compensation branches emit real float16 ops while exporting."""
    comps = [m for m in model.modules() if hasattr(m, "export_half")]
    for m in comps:
        m.export_half = True
    try:
        yield model
    finally:
        for m in comps:
            m.export_half = False


class _TextInputs(nn.Module):
    """(input_ids, attention_mask) positional inputs for a model that takes a dict."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model({"input_ids": input_ids, "attention_mask": attention_mask})


def export_onnx(model: nn.Module, path: str, example_inputs: Any, opset: int = 21, optimize: bool = False) -> str:
    """Export `model` (a converted, packed quantized model) with a dynamic batch axis; returns `path`."""
    model = model.eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    if isinstance(example_inputs, dict):
        module: nn.Module = _TextInputs(model).eval()
        args = (example_inputs["input_ids"], example_inputs["attention_mask"])
        names = ["input_ids", "attention_mask"]
        dynamic = {"input_ids": {0: batch}, "attention_mask": {0: batch}}
    else:
        module, args, names, dynamic = model, (example_inputs,), ["x"], {"x": {0: batch}}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    table = {
        torch.ops.thrifty.dequantize_per_channel.default: _dequantize_onnx,
        torch.ops.thrifty.fake_quant_uint8.default: _fake_quant_onnx,
    }
    with export_mode(model), torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used.*")
        torch.onnx.export(
            module,
            args,
            path,
            dynamo=True,
            opset_version=opset,
            input_names=names,
            output_names=["logits"],
            dynamic_shapes=dynamic,
            custom_translation_table=table,
            external_data=False,
            optimize=optimize,
            verbose=False,
        )
    return path


def ort_session(path: str, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def ort_feed(inputs: Any, names: Any = ("input_ids", "attention_mask")) -> dict[str, np.ndarray]:
    """onnxruntime inputs: the dict entries the graph reads (`names`; int64), or one float tensor `x`."""
    if isinstance(inputs, dict):
        return {k: v.cpu().numpy().astype(np.int64) for k, v in inputs.items() if k in names}
    return {"x": inputs.cpu().numpy().astype(np.float32)}


def ort_logits(session, inputs: Any) -> torch.Tensor:
    names = {i.name for i in session.get_inputs()}
    return torch.from_numpy(session.run(["logits"], ort_feed(inputs, names))[0])


def evaluate_onnx(
    path: str, dataset, batch_size: int = 64, threads: int | None = None, objective: str | None = None
) -> dict[str, float]:
    """Top-1 accuracy of an exported model on a thrifty dataset; with another `objective` (e.g. "binary": AUC,
    log loss) its meters instead."""
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
