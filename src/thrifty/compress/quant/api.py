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

from thrifty.compress.calibration import check_step, run_calibration
from thrifty.compress.quant.config import PTQConfig, QwTConfig, QwTV2Config
from thrifty.compress.quant.ptq import FilterFn, convert_ptq_, prepare_ptq_, prepare_ptq_for_loading_
from thrifty.compress.quant.qwt import convert_qwt_, prepare_qwt_, prepare_qwt_for_loading_
from thrifty.compress.quant.qwt_v2 import convert_qwt_v2_, prepare_qwt_v2_, prepare_qwt_v2_for_loading_
from thrifty.errors import ConfigError


_HANDLERS = {
    PTQConfig: (prepare_ptq_, convert_ptq_, prepare_ptq_for_loading_),
    QwTConfig: (prepare_qwt_, convert_qwt_, prepare_qwt_for_loading_),
    QwTV2Config: (prepare_qwt_v2_, convert_qwt_v2_, prepare_qwt_v2_for_loading_),
}


def _handlers(config: Any):
    if type(config) not in _HANDLERS:
        raise ConfigError(
            f"quantize_ takes a PTQConfig, QwTConfig or QwTV2Config, got {type(config).__name__}; build one with "
            "thrifty.compress.make_quant_config(method, bits)"
        )
    return _HANDLERS[type(config)]


def quantize_(
    model: nn.Module,
    config: PTQConfig | QwTConfig | QwTV2Config,
    calib_data: Iterable[Any] | None = None,
    *,
    filter_fn: FilterFn | None = None,
    spec: dict[str, Any] | None = None,
) -> None:
    """Quantize `model` in place following `config.step`; see the module docstring.

    Args:
        calib_data: batches (inputs, or (inputs, labels) pairs) for the one-call form; needs step="prepare".
        filter_fn: torchao-style `filter_fn(module, fqn) -> bool` restricting which Linear/Conv2d are quantized.
        spec: the saved structure (only for step="prepare_for_loading").
    """
    prepare, convert, prepare_for_loading = _handlers(config)
    step = check_step(config.step)
    if calib_data is not None:
        if step != "prepare":
            raise ConfigError(f"`calib_data` runs prepare -> batches -> convert; pass step='prepare', not {step!r}")
        prepare(model, config, filter_fn)
        limit = None if isinstance(config, PTQConfig) else config.calib_samples
        run_calibration(model, calib_data, limit)
        convert(model, config)
        return
    if step == "prepare":
        prepare(model, config, filter_fn)
    elif step == "convert":
        convert(model, config)
    else:
        if spec is None:
            raise ConfigError("step='prepare_for_loading' needs the saved `spec` (use load_quantized)")
        prepare_for_loading(model, spec, config)
