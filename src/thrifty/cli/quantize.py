"""`thrifty quantize`: post-training quantization (ptq | qwt | qwt_v2) of a fine-tuned model, calibrated on the
task's training split; writes quantized_model.safetensors + quantize_config.json (load with
`thrifty eval --quantized DIR`) and, with --onnx, model.onnx (QDQ; `thrifty eval --onnx DIR/model.onnx`).
The quantizers' spelling of `thrifty compress --method ptq|qwt|qwt_v2 --bits w4a8` (same code path)."""

from __future__ import annotations

import argparse
import typing

from thrifty.cli.common import add_backbone_args, add_config_args, add_data_args
from thrifty.cli.compress import add_run_args, calibration_loader, run_compressor, write_results


QUANTIZERS = ("ptq", "qwt", "qwt_v2")
__all__ = ["calibration_loader", "quant_options", "register", "run"]


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "quantize",
        help="post-training quantization with compensation",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_config_args(p)
    add_backbone_args(p, required=False)  # default: the backbone --adapter was trained on
    add_data_args(p)
    p.add_argument("--bits", default="w8a8", help="w{4,6,8}a{4,6,8,16}: weight and activation bits (a16: float)")
    p.add_argument("--method", default="ptq", choices=list(QUANTIZERS))
    add_run_args(p)
    return p


def quant_options(method: str, overrides: dict[str, str]) -> dict[str, typing.Any]:
    """`--set key=value` strings -> typed options of the method's config or of its PTQ base config (the
    compressor registry's options of `method`, less `bits`: the keywords of make_quant_config)."""
    from thrifty.compress.registry import coerce_options
    from thrifty.errors import ConfigError

    if "bits" in overrides:
        raise ConfigError("`bits` is make_quant_config's positional argument (or `thrifty quantize --bits`)")
    return coerce_options(method, overrides)


def run(args: argparse.Namespace) -> int:
    from thrifty.compress.quant.config import parse_bits

    parse_bits(args.bits)  # w{4,6,8}a{4,6,8}, checked before any model is loaded
    results = run_compressor(args, args.method, {**args.overrides, "bits": args.bits})
    names = {"options": "bits", "compressed_test": "quantized_test"}  # this command's result keys
    results = {names.get(k, k): args.bits if k == "options" else v for k, v in results.items()}
    write_results(args.output, results)
    return 0
