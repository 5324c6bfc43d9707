"""Model-rewriting compression (torchao-style verbs: in place, trailing underscore, return None).

`compress_(model, config, calib)` runs any registered compressor (thrifty.compress.registry: one registration
per config class, named by `config_cls.method`); `quantize_` is the quantizers' spelling of it, with `PTQConfig`,
`QwTConfig` or `QwTV2Config` (thrifty.compress.quant). All data-driven methods share one calibration protocol
(thrifty.compress.calibration).
"""

from thrifty.compress.calibration import STEPS, CalibrationStep, check_step, protocol_handler, run_calibration
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
from thrifty.compress.registry import (
    Compressor,
    available_compressors,
    compress_,
    compressor_for,
    config_dict,
    get_compressor,
    load_compressed,
    make_compressor_config,
    register_compressor,
    saved_method,
    unregister_compressor,
)


__all__ = [
    "STEPS",
    "CalibrationStep",
    "Compressor",
    "PTQConfig",
    "QwTConfig",
    "QwTV2Config",
    "available_compressors",
    "check_step",
    "compress_",
    "compressor_for",
    "config_dict",
    "get_compressor",
    "load_compressed",
    "load_quantized",
    "make_compressor_config",
    "make_quant_config",
    "protocol_handler",
    "quantize_",
    "register_compressor",
    "run_calibration",
    "save_quantized",
    "saved_method",
    "set_quant_state",
    "unregister_compressor",
]
