"""Model-rewriting compression (torchao-style verbs: in place, trailing underscore, return None).

`quantize_` with `PTQConfig`, `QwTConfig` or `QwTV2Config` (thrifty.compress.quant); all data-driven methods
share one calibration protocol (thrifty.compress.calibration).
"""

from thrifty.compress.calibration import STEPS, CalibrationStep, check_step, run_calibration
from thrifty.compress.quant import (
    PTQConfig,
    QwTConfig,
    QwTV2Config,
    load_quantized,
    make_quant_config,
    quantize_,
    save_quantized,
    set_quant_state,
)


__all__ = [
    "STEPS",
    "CalibrationStep",
    "PTQConfig",
    "QwTConfig",
    "QwTV2Config",
    "check_step",
    "load_quantized",
    "make_quant_config",
    "quantize_",
    "run_calibration",
    "save_quantized",
    "set_quant_state",
]
