"""`thrifty quantize`: post-training quantization (ptq | qwt | qwt_v2) of a fine-tuned model, calibrated on the
task's training split; writes quantized_model.safetensors + quantize_config.json (load with
`thrifty eval --quantized DIR`) and, with --onnx, model.onnx (QDQ; `thrifty eval --onnx DIR/model.onnx`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import typing
import warnings

from thrifty.cli.common import add_backbone_args, add_config_args, add_data_args, backbone_kwargs


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "quantize",
        help="post-training quantization with compensation",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_config_args(p)
    add_backbone_args(p)
    add_data_args(p)
    p.add_argument("--adapter", help="fine-tuned adapter directory (LoRA is merged first); default: untrained head")
    p.add_argument("--bits", default="w8a8", help="w{4,6,8}a{4,6,8}: weight and activation bits")
    p.add_argument("--method", default="ptq", choices=["ptq", "qwt", "qwt_v2"])
    p.add_argument("--calib-samples", type=int, default=512, help="training-split samples used for calibration")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="seed of the 1k split draw and the calibration sample")
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--onnx", action="store_true", help="also export model.onnx (QDQ) and check it in onnxruntime")
    p.add_argument("--eval", action="store_true", help="report test accuracy of the float and quantized models")
    return p


def quant_options(method: str, overrides: dict[str, str]) -> dict[str, typing.Any]:
    """`--set key=value` strings -> typed options of the method's config or of its PTQ base config."""
    from thrifty.compress.quant.config import QUANT_CONFIGS, PTQConfig
    from thrifty.errors import ConfigError
    from thrifty.values import coerce

    out = {}
    for key, value in overrides.items():
        for cls in (QUANT_CONFIGS[method], PTQConfig):
            names = {f.name for f in dataclasses.fields(cls)}
            if key in names and key not in ("step", "base_config", "w_bits", "a_bits"):
                out[key] = coerce(value, typing.get_type_hints(cls)[key], key)
                break
        else:
            raise ConfigError(f"`--set {key}`: not an option of {method} or its PTQ base config")
    return out


def calibration_loader(task, n: int, batch_size: int, seed: int):
    """A seeded random sample of `n` training-split samples (never test)."""
    import torch
    from torch.utils.data import DataLoader

    train = task.split("train")
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[: min(n, len(train))]
    return DataLoader(train.subset(sorted(idx.tolist())), batch_size=batch_size, shuffle=False)


def run(args: argparse.Namespace) -> int:
    import torch

    from thrifty.backbones import load_backbone
    from thrifty.compress import make_quant_config, quantize_, save_quantized
    from thrifty.compress.quant.config import parse_bits
    from thrifty.data import load_data
    from thrifty.io import write_json
    from thrifty.train import evaluate
    from thrifty.tuners import get_tuned_model, load_tuned_model, make_config

    w, a = parse_bits(args.bits)
    cfg = make_quant_config(args.method, (w, a), **quant_options(args.method, args.overrides))
    if args.method != "ptq":
        cfg = cfg.replace(calib_samples=args.calib_samples)
    bkw = backbone_kwargs(args)
    bb = load_backbone(args.backbone, **bkw)
    seed = args.seed if args.split_seed is None else args.split_seed
    task = load_data(args.data, bb.preprocess, seed=seed, test_size=args.test_size)
    if args.adapter:
        model = load_tuned_model(bb, args.adapter)
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
    else:
        warnings.warn(
            "no --adapter: quantizing the backbone with an untrained head (accuracy is meaningless)", stacklevel=2
        )
        model = get_tuned_model(bb, make_config("linear"), task.num_classes)
    model.eval()
    results: dict[str, typing.Any] = {"backbone": args.backbone, "data": task.name, "method": args.method}
    results.update(bits=args.bits, calib_samples=args.calib_samples, adapter=args.adapter)
    if args.eval:
        results["float_test"] = evaluate(model, task.split("test"), 64)
    loader = calibration_loader(task, args.calib_samples, args.batch_size, args.seed)
    quantize_(model, cfg, calib_data=loader)
    kept = {k: v for k, v in bkw.items() if k in ("max_length", "image_size") and v is not None}
    extra = {"data": task.name, "adapter": args.adapter, "seed": args.seed, "calib_samples": args.calib_samples}
    save_quantized(model, args.output, backbone_spec=args.backbone, backbone_kwargs=kept, extra=extra)
    log = model.thrifty_quant["spec"].get("compensation_log", [])
    results["compensation"] = [
        {k: e[k] for k in ("block", "layer", "r2", "compensated", "error_reduction") if k in e} for e in log
    ]
    if args.eval:
        results["quantized_test"] = evaluate(model, task.split("test"), 64)
    if args.onnx:
        from thrifty.compress.quant.onnx_export import evaluate_onnx, export_onnx, ort_logits, ort_session

        x = next(iter(loader))[0]
        path = export_onnx(model, os.path.join(args.output, "model.onnx"), x)
        with torch.no_grad():
            ref = model(x)
        out = ort_logits(ort_session(path), x)
        results["onnx"] = {
            "path": path,
            "max_abs_diff_vs_pytorch": float((out - ref).abs().max()),
            "argmax_agreement": float((out.argmax(-1) == ref.argmax(-1)).float().mean()),
        }
        if args.eval:
            results["onnx"]["test"] = evaluate_onnx(path, task.split("test"))
    write_json(os.path.join(args.output, "results.json"), results)
    print(json.dumps(results, indent=2))
    return 0
