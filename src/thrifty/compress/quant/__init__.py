"""Post-training quantization with compensation: base PTQ, QwT, QwT-v2 (CWAC), save/load, ONNX QDQ export."""

import thrifty.compress.quant.registration  # noqa: F401  (registers ptq, qwt, qwt_v2)
from thrifty.compress.quant.api import quantize_
from thrifty.compress.quant.config import PTQConfig, QwTConfig, QwTV2Config, make_quant_config, parse_bits
from thrifty.compress.quant.layers import QuantConv2d, QuantLinear, SoftmaxQuant, quant_state, set_quant_state
from thrifty.compress.quant.serialize import load_quantized, save_quantized


__all__ = [
    "PTQConfig",
    "QuantConv2d",
    "QuantLinear",
    "QwTConfig",
    "QwTV2Config",
    "SoftmaxQuant",
    "load_quantized",
    "make_quant_config",
    "parse_bits",
    "quant_state",
    "quantize_",
    "save_quantized",
    "set_quant_state",
]
