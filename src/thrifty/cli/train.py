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
    return p


def run(args: argparse.Namespace) -> int:
    import yaml

    from thrifty.io import write_text
    from thrifty.train import run_training

    os.makedirs(args.output, exist_ok=True)
    cfg = resolved_config(args)
    text = yaml.safe_dump(cfg, sort_keys=True)
    write_text(os.path.join(args.output, "config.yaml"), text)
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
        **backbone_kwargs(args),
    )
    if "metrics" in results:
        print(json.dumps({k: v for k, v in results["metrics"].items()}, indent=2))
    return 0
