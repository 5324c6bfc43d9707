"""`quantize_(model, config, calib_data=None, filter_fn=None)`: torchao's verb, in place, returns None.

    quantize_(model, PTQConfig(w_bits=4, a_bits=8))                     # step="prepare": observers in
    for batch in calib_loader: model(batch)                              # calibration (train split only)
    quantize_(model, PTQConfig(w_bits=4, a_bits=8, step="convert"))     # scales (+ compensation), packed

or in one call, `quantize_(model, QwTConfig(base_config=PTQConfig(w_bits=4)), calib_data=calib_loader)`, which
runs the same three steps. `step="prepare_for_loading"` is used by `load_quantized` with the saved spec.
A prepared model is bit-width independent: deep copies of it may be converted at different widths.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from thrifty.compress.calibration import protocol_handler
from thrifty.compress.quant.config import QUANT_CONFIGS, PTQConfig, QwTConfig, QwTV2Config
from thrifty.compress.quant.ptq import FilterFn, convert_ptq_, prepare_ptq_, prepare_ptq_for_loading_
from thrifty.compress.quant.qwt import convert_qwt_, prepare_qwt_, prepare_qwt_for_loading_
from thrifty.compress.quant.qwt_v2 import convert_qwt_v2_, prepare_qwt_v2_, prepare_qwt_v2_for_loading_
from thrifty.compress.registry import compress_
from thrifty.errors import ConfigError


# the `apply` of each quantizer's registration (thrifty.compress.quant.registration)
apply_ptq_ = protocol_handler(prepare_ptq_, convert_ptq_, prepare_ptq_for_loading_)
apply_qwt_ = protocol_handler(prepare_qwt_, convert_qwt_, prepare_qwt_for_loading_)
apply_qwt_v2_ = protocol_handler(prepare_qwt_v2_, convert_qwt_v2_, prepare_qwt_v2_for_loading_)


def quantize_(
    model: nn.Module,
    config: PTQConfig | QwTConfig | QwTV2Config,
    calib_data: Iterable[Any] | None = None,
    *,
    filter_fn: FilterFn | None = None,
    spec: dict[str, Any] | None = None,
) -> None:
    """Quantize `model` in place following `config.step`; see the module docstring. The quantizers' spelling of
    `thrifty.compress.compress_` (same registry dispatch), restricted to quantization configs.

    Args:
        calib_data: batches (inputs, or (inputs, labels) pairs) for the one-call form; needs step="prepare".
        filter_fn: torchao-style `filter_fn(module, fqn) -> bool` restricting which Linear/Conv2d are quantized.
        spec: the saved structure (only for step="prepare_for_loading").
    """
    if type(config) not in QUANT_CONFIGS.values():
        raise ConfigError(
            f"quantize_ takes a PTQConfig, QwTConfig or QwTV2Config, got {type(config).__name__}; build one with "
            "thrifty.compress.make_quant_config(method, bits), or use compress_ for other compressors"
        )
    compress_(model, config, calib_data, filter_fn=filter_fn, spec=spec)
