"""`thrifty compress --method NAME`: run any registered compressor on a model, calibrated on a seeded sample of the
task's training split (never test). Writes the compressor's files and results.json to --output (load them with
`thrifty.compress.load_compressed`; quantized models also with `thrifty eval --quantized DIR`) and, with --onnx
where the compressor exports, model.onnx. Compressor options: `--set key=value`, or the compressor's own flags
(group "compressor flags"). `thrifty quantize` is the quantizers' spelling of this command (same code path)."""

from __future__ import annotations

import argparse
import json
import os
import typing
import warnings

from thrifty.cli.common import add_backbone_args, add_config_args, add_data_args, backbone_for_run
from thrifty.errors import ConfigError


def register(sub) -> argparse.ArgumentParser:
    from thrifty.compress import available_compressors

    p = sub.add_parser(
        "compress",
        help="compress a model with any registered compressor",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_config_args(p)
    add_backbone_args(p, required=False)  # default: the backbone --adapter was trained on
    add_data_args(p)
    p.add_argument("--method", required=True, choices=available_compressors(), help="registered compressor")
    add_run_args(p)
    add_compressor_flags(p)
    return p


def add_run_args(p: argparse.ArgumentParser) -> None:
    """The flags `thrifty compress` and `thrifty quantize` share."""
    p.add_argument("--adapter", help="fine-tuned adapter directory (LoRA is merged first); default: untrained head")
    p.add_argument("--calib-samples", type=int, default=512, help="training-split samples used for calibration")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="seed of the 1k split draw and the calibration sample")
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--onnx", action="store_true", help="also export model.onnx and check it in onnxruntime")
    p.add_argument("--eval", action="store_true", help="report test metrics of the float and compressed models")


def compressor_flags() -> dict[str, list[str]]:
    """Flag option -> the compressors exposing it (their configs' `cli_flags`)."""
    from thrifty.compress import available_compressors, get_compressor

    out: dict[str, list[str]] = {}
    for name in available_compressors():
        for flag in get_compressor(name).cli_flags:
            out.setdefault(flag, []).append(name)
    return out


def add_compressor_flags(p: argparse.ArgumentParser) -> None:
    """One `--kebab-name` flag per option named in a registered config's `cli_flags` (string-valued; coerced to
    the option's type by make_compressor_config, like --set). A name shared by compressors is one flag."""
    from thrifty.compress import get_compressor

    g = p.add_argument_group("compressor flags", "options of individual compressors (each also takes --set KEY=VALUE)")
    taken = {a.dest for a in p._actions}
    for flag, names in compressor_flags().items():
        if flag in taken:
            raise ConfigError(
                f"compressor(s) {names} list `{flag}` in cli_flags, which clashes with a `thrifty compress` flag; "
                "remove it from cli_flags (it stays reachable with --set)"
            )
        text = get_compressor(names[0]).help_of(flag)
        g.add_argument(
            "--" + flag.replace("_", "-"),
            dest=flag,
            metavar="VALUE",
            default=argparse.SUPPRESS,  # absent unless given: the config's default applies
            help=f"{text} [{', '.join(names)}]".lstrip(),
        )


def flag_options(args: argparse.Namespace, method: str) -> dict[str, typing.Any]:
    """The compressor flags given on the command line; a flag of another compressor raises ConfigError."""
    from thrifty.compress import get_compressor

    own = get_compressor(method).cli_flags
    out = {}
    for flag, names in compressor_flags().items():
        value = getattr(args, flag, None)
        if value is None:
            continue
        if flag not in own:
            raise ConfigError(f"--{flag.replace('_', '-')} is an option of {', '.join(names)}, not of {method}")
        out[flag] = value
    return out


def calibration_loader(task, n: int, batch_size: int, seed: int):
    """A seeded random sample of `n` training-split samples (never test)."""
    import torch
    from torch.utils.data import DataLoader

    train = task.split("train")
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[: min(n, len(train))]
    return DataLoader(train.subset(sorted(idx.tolist())), batch_size=batch_size, shuffle=False)


def default_model(backbone, task, adapter: str | None, seed: int = 0):
    """The fine-tuned classifier of `adapter` (LoRA merged), else the backbone with a seeded untrained head."""
    import torch

    from thrifty.tuners import get_tuned_model, load_tuned_model, make_config

    if adapter:
        model = load_tuned_model(backbone, adapter)
        return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    warnings.warn(
        "no --adapter: compressing the backbone with an untrained head (accuracy is meaningless)", stacklevel=2
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return get_tuned_model(backbone, make_config("full"), task.num_classes)


def default_evaluate(model, task) -> dict[str, typing.Any]:
    from thrifty.train import evaluate

    return evaluate(model, task.split("test"), 64)


def run_compressor(args: argparse.Namespace, method: str, options: dict[str, typing.Any]) -> dict[str, typing.Any]:
    """Build the model and calibration batches, `compress_`, save to args.output; returns the results dict."""
    import dataclasses

    from thrifty.backbones import load_backbone
    from thrifty.compress import available_compressors, compress_, get_compressor, make_compressor_config
    from thrifty.data import load_data

    entry = get_compressor(method)
    config = make_compressor_config(method, options)
    if "calib_samples" in {f.name for f in dataclasses.fields(config)} and "calib_samples" not in options:
        config = dataclasses.replace(config, calib_samples=args.calib_samples)
    if args.onnx and entry.export_onnx is None:
        exporters = [n for n in available_compressors() if get_compressor(n).export_onnx is not None]
        raise ConfigError(f"--onnx: {method} has no ONNX export (compressors that export: {', '.join(exporters)})")
    bb = load_backbone(backbone_for_run(args, args.adapter))
    seed = args.seed if args.split_seed is None else args.split_seed
    task = load_data(args.data, bb.preprocess, seed=seed, test_size=args.test_size)
    bb.fit_to_task_(task, seed=args.seed)
    if entry.cli_model is not None:
        model = entry.cli_model(bb, task, args.adapter)
    else:
        model = default_model(bb, task, args.adapter, args.seed)
    model.eval()
    evaluate = entry.cli_evaluate or default_evaluate
    results: dict[str, typing.Any] = {"backbone": args.backbone, "data": task.name, "method": method}
    results.update(options=options, calib_samples=args.calib_samples, adapter=args.adapter)
    if args.eval:
        results["float_test"] = evaluate(model, task)
    calib = (entry.cli_calibration or calibration_loader)(task, args.calib_samples, args.batch_size, args.seed)
    compress_(model, config, calib)
    extra = {"data": task.name, "adapter": args.adapter, "seed": args.seed, "calib_samples": args.calib_samples}
    entry.save(model, args.output, extra=extra)
    if entry.summarize is not None:
        results.update(entry.summarize(model))
    if args.eval:
        results["compressed_test"] = evaluate(model, task)
    if args.onnx:
        results["onnx"] = _export_and_check(entry, model, calib, args.output, task if args.eval else None)
    return results


def _export_and_check(entry, model, calib, output: str, task) -> dict[str, typing.Any]:
    """model.onnx, its agreement with the PyTorch model on one calibration batch, and (with `task`) its test
    accuracy in onnxruntime."""
    import torch

    from thrifty.compress.calibration import batch_inputs
    from thrifty.compress.quant.onnx_export import evaluate_onnx, ort_logits, ort_session

    x = batch_inputs(next(iter(calib)))
    path = entry.export_onnx(model, os.path.join(output, "model.onnx"), x)
    with torch.no_grad():
        ref = model(x)
    out = ort_logits(ort_session(path), x)
    res = {
        "path": path,
        "max_abs_diff_vs_pytorch": float((out - ref).abs().max()),
        "argmax_agreement": float((out.argmax(-1) == ref.argmax(-1)).float().mean()),
    }
    if task is not None:
        res["test"] = evaluate_onnx(path, task.split("test"), objective=getattr(model, "objective", None))
    return res


def write_results(output: str, results: dict[str, typing.Any]) -> None:
    from thrifty.io import write_json

    write_json(os.path.join(output, "results.json"), results)
    print(json.dumps(results, indent=2))


def run(args: argparse.Namespace) -> int:
    options = {**args.overrides, **flag_options(args, args.method)}
    write_results(args.output, run_compressor(args, args.method, options))
    return 0
