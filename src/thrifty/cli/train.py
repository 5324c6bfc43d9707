"""`thrifty train`: train one method on one task; writes the adapter, results.json and config.yaml."""

from __future__ import annotations

import argparse
import json
import os

from thrifty.cli.common import (
    add_config_args,
    add_options,
    backbone_spec,
    log_progress,
    resolved_config,
    train_config,
)
from thrifty.train.options import TRAIN_COMMAND


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train",
        help="train a method on a task",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_config_args(p)
    add_options(p, TRAIN_COMMAND)
    return p


def run(args: argparse.Namespace) -> int:
    import yaml

    from thrifty.io import write_text
    from thrifty.train import run_training

    log_progress(args.no_progress)  # e.g. the feature-cache estimate before an extraction (thrifty.features)
    os.makedirs(args.output, exist_ok=True)
    cfg = resolved_config(args)
    text = yaml.safe_dump(cfg, sort_keys=True)
    write_text(os.path.join(args.output, "config.yaml"), text)
    from thrifty.train.members import parse_sweep

    results = run_training(
        backbone=backbone_spec(args),
        data=args.data,
        method=args.method,
        objective=args.objective,
        sweep=parse_sweep(args.sweep) if args.sweep else None,
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
        remote=args.remote,
        token_file=args.token_file,
        keep_features=args.keep_features,
        disk_check=not args.skip_disk_check,
    )
    if args.sweep:
        print(results["table"])
        print(results["selection"] + (f": {results['selected']}" if results["selected"] else ""))
    elif "metrics" in results:
        print(json.dumps({k: v for k, v in results["metrics"].items()}, indent=2))
    return 0
