"""`thrifty train`: train one method on one task; writes the adapter, results.json and config.yaml."""

from __future__ import annotations

import argparse
import json
import os

from thrifty.cli.common import (
    add_backbone_args,
    add_config_args,
    add_data_args,
    add_train_args,
    backbone_kwargs,
    resolved_config,
    train_config,
)


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train",
        help="train a method on a task",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_config_args(p)
    add_backbone_args(p)
    add_data_args(p)
    p.add_argument("--method", required=True, help="linear | full | lora | adaptformer | ...")
    add_train_args(p)
    g = p.add_argument_group("output")
    g.add_argument("--output", required=True, help="run directory (adapter files, results.json, checkpoint)")
    g.add_argument("--resume", action="store_true", help="continue from the checkpoint in --output")
    g.add_argument("--overwrite", action="store_true", help="replace finished results in --output")
    g.add_argument("--no-peak-memory", action="store_true", help="skip the fresh-process peak-memory measurement")
    g.add_argument("--keep-checkpoint", action="store_true", help="keep checkpoint.safetensors after success")
    g = p.add_argument_group("side methods")
    g.add_argument("--cache", help="feature-cache dir (thrifty extract): train a side method from cached taps")
    g.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="train every combination together on one backbone pass (repeatable; training or method options); "
        "writes one run per combination under --output plus summary.md",
    )
    return p


def run(args: argparse.Namespace) -> int:
    import yaml

    from thrifty.io import write_text
    from thrifty.train import run_training

    os.makedirs(args.output, exist_ok=True)
    cfg = resolved_config(args)
    text = yaml.safe_dump(cfg, sort_keys=True)
    write_text(os.path.join(args.output, "config.yaml"), text)
    if args.sweep:
        return run_sweep_cli(args)
    results = run_training(
        backbone=args.backbone,
        data=args.data,
        method=args.method,
        overrides=args.overrides,
        train=train_config(args),
        output_dir=args.output,
        test_size=args.test_size,
        split_seed=args.split_seed,
        resume=args.resume,
        overwrite=args.overwrite,
        peak_memory=not args.no_peak_memory,
        keep_checkpoint=args.keep_checkpoint,
        cache=args.cache,
        **backbone_kwargs(args),
    )
    if "metrics" in results:
        print(json.dumps({k: v for k, v in results["metrics"].items()}, indent=2))
    return 0


def run_sweep_cli(args: argparse.Namespace) -> int:
    from thrifty.errors import ConfigError
    from thrifty.train.sweep import parse_sweep, run_sweep

    if args.resume:
        raise ConfigError("--resume is not supported with --sweep; rerun the sweep (use --overwrite)")
    summary = run_sweep(
        backbone=args.backbone,
        data=args.data,
        method=args.method,
        sweep=parse_sweep(args.sweep),
        overrides=args.overrides,
        train=train_config(args),
        output_dir=args.output,
        cache=args.cache,
        test_size=args.test_size,
        split_seed=args.split_seed,
        overwrite=args.overwrite,
        **backbone_kwargs(args),
    )
    print(summary["table"])
    print(summary["selection"] + (f": {summary['selected']}" if summary["selected"] else ""))
    return 0
