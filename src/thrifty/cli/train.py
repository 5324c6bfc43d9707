"""`thrifty train`: train one method on one task; writes the adapter, results.json and config.yaml."""

from __future__ import annotations

import argparse

from thrifty.cli.common import (
    add_config_args,
    add_json_flag,
    add_options,
    backbone_spec,
    emit,
    log_progress,
    save_config,
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
    add_json_flag(p)
    return p


def run(args: argparse.Namespace) -> int:
    from thrifty.train import run_training

    log_progress(args.no_progress)  # e.g. the feature-cache estimate before an extraction (thrifty.features)
    from thrifty.train.members import parse_sweep

    save_config(args, args.output)

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
        summary = (
            results["table"]
            + "\n"
            + results["selection"]
            + (f": {results['selected']}" if results["selected"] else "")
        )
        emit(args, {k: v for k, v in results.items() if k != "table"}, summary)
    elif "metrics" in results:
        emit(args, results["metrics"], run_summary(results, args.output))
    return 0


def run_summary(results: dict, output: str) -> str:
    """Two lines: the objective's test metrics, then the costs and where the files are."""
    m = results["metrics"]
    tests = ", ".join(f"{k[5:]} {v:.4f}" for k, v in m.items() if k.startswith("test_") and isinstance(v, float))
    costs = [
        f"{m['trainable_params']:,d} trainable params",
        f"adapter {m.get('adapter_bytes', 0) / 1e6:.2f} MB",
        f"{m['seconds_per_epoch']:.1f} s/epoch",
    ]
    return (
        f"test: {tests} ({m.get('test_samples')} samples)\n" + ", ".join(costs) + f"; results: {output}/results.json"
    )
