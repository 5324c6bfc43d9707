"""The quantizers' registrations on the compressor registry: `ptq`, `qwt`, `qwt_v2` (names from the configs).

Options (`make_compressor_config`, `thrifty compress --set`): the method config's fields and its PTQ base config's
fields (except `step`, `base_config`, `w_bits`, `a_bits`, `version`), plus `bits` ("w4a8", also the `--bits` flag),
exactly what `thrifty quantize` has always accepted.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Any

from torch import nn

from thrifty.compress.quant.api import apply_ptq_, apply_qwt_, apply_qwt_v2_
from thrifty.compress.quant.config import CLI_BITS, PTQConfig, QwTConfig, QwTV2Config, make_quant_config, parse_bits
from thrifty.compress.quant.serialize import CONFIG_NAME, load_quantized, save_quantized
from thrifty.compress.registry import register_compressor


_NOT_OPTIONS = ("step", "base_config", "w_bits", "a_bits", "version")
_WIDTHS = ",".join(map(str, CLI_BITS))
BITS_HELP = f"weight and activation bits, w{{{_WIDTHS}}}a{{{_WIDTHS},16}} (a16: float activations; default w8a8)"


def quant_option_types(config_cls: type) -> dict[str, Any]:
    """Option name -> type hint: the method's own fields first, then its PTQ base config's, then `bits`."""
    out: dict[str, Any] = {}
    for cls in (config_cls, PTQConfig):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name not in _NOT_OPTIONS and f.name not in out:
                out[f.name] = hints[f.name]
    out["bits"] = str
    return out


def make_from_options(method: str, options: dict[str, Any]):
    """Typed options -> config (`bits` parsed as `thrifty quantize --bits` does)."""
    opts = dict(options)
    bits = opts.pop("bits", "w8a8")
    return make_quant_config(method, parse_bits(bits) if isinstance(bits, str) else tuple(bits), **opts)


def summarize(model: nn.Module) -> dict[str, Any]:
    """The per-block / per-layer compensation log (empty for plain PTQ), for results.json."""
    log = model.thrifty_quant["spec"].get("compensation_log", [])
    keys = ("block", "layer", "r2", "compensated", "error_reduction")
    return {"compensation": [{k: e[k] for k in keys if k in e} for e in log]}


def export_onnx(model: nn.Module, path: str, example_inputs: Any) -> str:
    """The deployment ONNX graph on integer kernels (thrifty.compress.quant.onnx_export)."""
    from thrifty.compress.quant import onnx_export

    return onnx_export.export_onnx(model, path, example_inputs)


def onnx_model_options(model: nn.Module, config: Any) -> dict[str, Any]:
    """`thrifty compress/quantize --onnx` on a CNN backbone at 8-bit activations: conv outputs quantized
    (`conv_output_quant`), the form onnxruntime runs on QLinearConv / QLinearAdd (thrifty.compress.quant.conv_qdq;
    the ConvInteger form is 5-30x slower than float on EfficientNet-Lite0); `--set conv_output_quant=false` keeps
    the ConvInteger form."""
    base = getattr(config, "base_config", config)
    bb = getattr(model, "backbone", model)
    return {"conv_output_quant": True} if base.a_bits == 8 and getattr(bb, "kind", None) == "cnn" else {}


for _cls, _apply in ((PTQConfig, apply_ptq_), (QwTConfig, apply_qwt_), (QwTV2Config, apply_qwt_v2_)):
    register_compressor(
        _cls,
        apply=_apply,
        save=save_quantized,
        load=load_quantized,
        options=quant_option_types(_cls),
        make_config=functools.partial(make_from_options, _cls.method),
        option_help={"bits": BITS_HELP},
        manifest=CONFIG_NAME,
        config_key="quant_config",
        export_onnx=export_onnx,
        onnx_options={"softmax_quantizer": "uniform"},  # P x V on integer kernels (log2 has no integer form)
        onnx_model_options=onnx_model_options,
        summarize=summarize,
    )
