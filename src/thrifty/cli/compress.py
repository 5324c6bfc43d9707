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

from thrifty.cli.common import (
    add_backbone_args,
    add_config_args,
    add_data_args,
    backbone_for_run,
    log_progress,
    save_config,
)
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
    p.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="calibration and evaluation batch (a causal LM's eval holds batch x tokens x vocab logits: lower it "
        "for long --max-length)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the 1k split draw and the calibration sample")
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument(
        "--onnx",
        action="store_true",
        help="also export model.onnx (integer kernels in onnxruntime) and check it there; quantizers then default "
        "to softmax_quantizer=uniform",
    )
    p.add_argument("--eval", action="store_true", help="report test metrics of the float and compressed models")
    p.add_argument("--no-progress", action="store_true", help="no progress lines or bars on stderr")


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


def default_evaluate(model, task, batch_size: int = 32) -> dict[str, typing.Any]:
    from thrifty.compress.progress import progress_enabled
    from thrifty.train import evaluate

    return evaluate(model, task.split("test"), batch_size, progress=progress_enabled(), desc="eval test")


def run_compressor(args: argparse.Namespace, method: str, options: dict[str, typing.Any]) -> dict[str, typing.Any]:
    """Build the model and calibration batches, `compress_`, save to args.output; returns the results dict (with
    the seconds of each step and the bytes written). Steps report progress on stderr (thrifty.compress.progress)."""
    import dataclasses
    import functools
    import time

    from thrifty.backbones import load_backbone
    from thrifty.compress import available_compressors, compress_, get_compressor, make_compressor_config
    from thrifty.compress.progress import stage
    from thrifty.data import load_data

    log_progress(getattr(args, "no_progress", False))
    t0 = time.perf_counter()
    entry = get_compressor(method)
    if args.onnx:  # compress for the engine: e.g. integer-kernel attention probabilities
        options = {**{k: v for k, v in entry.onnx_options.items() if k not in options}, **options}

    def build_config(options: dict[str, typing.Any]) -> typing.Any:
        config = make_compressor_config(method, options)
        if "calib_samples" in {f.name for f in dataclasses.fields(config)} and "calib_samples" not in options:
            config = dataclasses.replace(config, calib_samples=args.calib_samples)
        return config

    config = build_config(options)
    if args.onnx and entry.export_onnx is None:
        exporters = [n for n in available_compressors() if get_compressor(n).export_onnx is not None]
        raise ConfigError(f"--onnx: {method} has no ONNX export (compressors that export: {', '.join(exporters)})")
    seconds: dict[str, float] = {}
    spec = backbone_for_run(args, args.adapter)
    with stage(f"loading {spec.name} and {args.data}") as info:
        bb = load_backbone(spec)
        seed = args.seed if args.split_seed is None else args.split_seed
        task = load_data(args.data, bb.preprocess, seed=seed, test_size=args.test_size)
        bb.fit_to_task_(task, seed=args.seed)
        if entry.cli_model is not None:
            model = entry.cli_model(bb, task, args.adapter)
        else:
            model = default_model(bb, task, args.adapter, args.seed)
        model.eval()
    seconds["load"] = info["seconds"]
    if args.onnx and entry.onnx_model_options is not None:  # defaults that depend on the loaded model
        extra = {k: v for k, v in entry.onnx_model_options(model, config).items() if k not in options}
        if extra:
            options = {**options, **extra}
            config = build_config(options)
    float_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    evaluate = entry.cli_evaluate or functools.partial(default_evaluate, batch_size=args.batch_size)
    results: dict[str, typing.Any] = {"backbone": spec.name, "data": task.name, "method": method}
    results.update(options=options, calib_samples=args.calib_samples, adapter=args.adapter)
    if args.eval:
        with stage("evaluating the float model") as info:
            results["float_test"] = evaluate(model, task)
        seconds["float_eval"] = info["seconds"]
    calib = (entry.cli_calibration or calibration_loader)(task, args.calib_samples, args.batch_size, args.seed)
    with stage(f"{method}: calibrating and compressing") as info:
        compress_(model, config, calib)
    seconds["compress"] = info["seconds"]
    extra = {"data": task.name, "adapter": args.adapter, "seed": args.seed, "calib_samples": args.calib_samples}
    with stage(f"saving to {args.output}") as info:
        entry.save(model, args.output, extra=extra)
        save_config(args, args.output)  # after the save, which may replace the folder
    seconds["save"] = info["seconds"]
    results["bytes"] = {"float_state_dict": float_bytes, "saved": _tree_bytes(args.output)}
    if entry.summarize is not None:
        results.update(entry.summarize(model))
    if args.eval:
        with stage(f"evaluating the {method} model") as info:
            results["compressed_test"] = evaluate(model, task)
        seconds["eval"] = info["seconds"]
    if args.onnx:
        with stage("exporting model.onnx and checking it in onnxruntime") as info:
            results["onnx"] = _export_and_check(entry, model, calib, args.output, task if args.eval else None)
        seconds["onnx"] = info["seconds"]
    seconds["total"] = time.perf_counter() - t0
    results["seconds"] = {k: round(v, 2) for k, v in seconds.items()}
    return results


def _tree_bytes(path: str) -> int:
    """Bytes of the files under `path` (what the compressor's `save` wrote there)."""
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


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
        "bytes": os.path.getsize(path),
        "max_abs_diff_vs_pytorch": float((out - ref).abs().max()),
        "argmax_agreement": float((out.argmax(-1) == ref.argmax(-1)).float().mean()),
    }
    if task is not None:
        res["test"] = evaluate_onnx(path, task.split("test"), objective=getattr(model, "objective", None))
    return res


def write_results(output: str, results: dict[str, typing.Any]) -> None:
    """results.json in `output` (every detail) and a short summary on stdout."""
    from thrifty.io import write_json

    path = os.path.join(output, "results.json")
    write_json(path, results)
    print("\n".join([*summary_lines(results, output), f"details: {path}"]))


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def _headline(metrics: typing.Any) -> str:
    """`accuracy 56.3%` (the first numeric metric; fractions named accuracy shown as percent)."""
    if not isinstance(metrics, dict):
        return str(metrics)
    for key, value in metrics.items():
        if isinstance(value, float) and key != "loss":
            return f"{key} {value:.1%}" if "accuracy" in key else f"{key} {value:.4g}"
    return json.dumps(metrics)


def summary_lines(results: dict[str, typing.Any], output: str) -> list[str]:
    """A few lines for people: what was compressed, test metric before/after, size, compensation, ONNX, time."""
    options = results.get("bits", results.get("options"))
    opts = options if isinstance(options, str) else ", ".join(f"{k}={v}" for k, v in (options or {}).items())
    head = f"{results['method']}{f' ({opts})' if opts else ''} of {results['backbone']} on {results['data']}"
    lines = [f"{head}, {results['calib_samples']} calibration samples -> {output}"]
    after = results.get("quantized_test", results.get("compressed_test"))
    if "float_test" in results and after is not None:
        lines.append(f"  test: float {_headline(results['float_test'])} -> compressed {_headline(after)}")
    size = results.get("bytes", {})
    if size:
        lines.append(f"  saved: {_mb(size['saved'])} (float state dict {_mb(size['float_state_dict'])})")
    comp = results.get("compensation")
    if comp:
        done = [e for e in comp if e.get("compensated", True)]
        gains = [e["error_reduction"] for e in comp if "error_reduction" in e]
        r2 = [e["r2"] for e in done if "r2" in e]
        note = f", mean error reduction {sum(gains) / len(gains):.1%}" if gains else ""
        note += f", mean R^2 {sum(r2) / len(r2):.3f}" if r2 else ""
        lines.append(f"  compensation: {len(done)} of {len(comp)} {'layers' if gains else 'blocks'}{note}")
    onnx = results.get("onnx")
    if onnx:
        test = f", test {_headline(onnx['test'])}" if "test" in onnx else ""
        diff = f"max |diff| vs PyTorch {onnx['max_abs_diff_vs_pytorch']:.2g}"
        lines.append(f"  onnx: {onnx['path']}, {_mb(onnx['bytes'])} ({diff}{test})")
    secs = results.get("seconds", {})
    if secs:
        steps = ", ".join(f"{k} {v:.0f} s" for k, v in secs.items() if k != "total")
        lines.append(f"  time: {secs['total']:.0f} s ({steps})")
    return lines


def run(args: argparse.Namespace) -> int:
    options = {**args.overrides, **flag_options(args, args.method)}
    write_results(args.output, run_compressor(args, args.method, options))
    return 0
