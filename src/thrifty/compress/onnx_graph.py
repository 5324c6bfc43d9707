"""One ONNX export call for every compressor that exports (`torch.onnx.export`, dynamo, dynamic batch axis).

A thrifty model reads a dict (text: input_ids + attention_mask; CTR: one int64 tensor per field) or one tensor
(images). ONNX graphs take named positional inputs, so a dict becomes one graph input per key (its name), a tensor
the input "x"; the output is "logits". Compressors add their ops (`table`: torch op -> onnxscript function).
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from torch import nn


class _DictInputs(nn.Module):
    """Positional tensors -> the dict the wrapped model reads."""

    def __init__(self, model: nn.Module, keys: list[str]):
        super().__init__()
        self.model, self.keys = model, keys

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.model(dict(zip(self.keys, tensors, strict=True)))


def export_graph(
    model: nn.Module,
    path: str,
    example_inputs: Any,
    *,
    opset: int,
    keys: list[str] | None = None,
    max_batch: int = 1 << 16,
    table: dict | None = None,
    optimize: bool = False,
) -> str:
    """Export `model` (eval mode, no grad) to `path` with a dynamic batch axis; `keys`: the dict inputs to keep
    (default: all, in their order). Returns `path`."""
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    if isinstance(example_inputs, dict):
        keys = list(example_inputs) if keys is None else keys
        module, args = _DictInputs(model, keys).eval(), tuple(example_inputs[k] for k in keys)
        dynamic: Any = (tuple({0: batch} for _ in keys),)
    else:
        keys, module, args, dynamic = ["x"], model, (example_inputs,), ({0: batch},)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used.*")
        torch.onnx.export(
            module,
            args,
            path,
            dynamo=True,
            opset_version=opset,
            input_names=keys,
            output_names=["logits"],
            dynamic_shapes=dynamic,
            custom_translation_table=table,
            external_data=False,
            optimize=optimize,
            verbose=False,
        )
    return path
