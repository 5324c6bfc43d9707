"""`thrifty extract`: run the frozen backbone once over a task's splits and store the taps a side method reads
(memory-mapped .npy chunks + manifest.json with checksums). Resumable: run it again after an interruption; it
also re-extracts any chunk that is missing, truncated or corrupt. Train from it with `thrifty train --cache DIR`."""

from __future__ import annotations

import argparse

from thrifty.cli.common import (
    add_backbone_args,
    add_config_args,
    add_data_args,
    backbone_spec,
    print_table,
    save_config,
)


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("extract", help="cache backbone features for side methods", description=__doc__)
    add_config_args(p)
    add_backbone_args(p)
    add_data_args(p)
    g = p.add_argument_group("features")
    g.add_argument("--method", help="store the taps this side method reads (with its --set options): linear, last")
    g.add_argument("--taps", help="or name them: comma-separated block.<i>, pooled, mask (e.g. block.11,pooled)")
    g.add_argument("--splits", default="all", help="comma-separated split names, or `all`")
    g.add_argument("--output", required=True, help="cache directory (created, or completed if it exists)")
    g.add_argument("--fp16", action="store_true", help="store float16 (half the disk; training is then approximate)")
    g.add_argument("--chunk-size", type=int, default=256, help="samples per chunk file")
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--seed", type=int, default=0, help="seed of the 1k split draw (use the training seed)")
    g.add_argument("--device", default="auto")
    g.add_argument("--no-amp", action="store_true", help="disable bf16 autocast on CUDA")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument(
        "--keep-denormals",
        action="store_true",
        help="CPU: do not flush subnormal floats to zero (training flushes them unless it has --keep-denormals too)",
    )
    return p


def run(args: argparse.Namespace) -> int:
    from thrifty.backbones import load_backbone
    from thrifty.data import load_data
    from thrifty.errors import ConfigError
    from thrifty.features import extract_features
    from thrifty.runtime import resolve_device
    from thrifty.tuners import get_tuned_model, make_config
    from thrifty.tuners.side import SideTuner

    if bool(args.method) == bool(args.taps):
        raise ConfigError("pass exactly one of --method (its taps) or --taps")
    save_config(args, args.output)
    bb = load_backbone(backbone_spec(args))
    seed = args.seed if args.split_seed is None else args.split_seed
    task = load_data(args.data, bb.preprocess, seed=seed, test_size=args.test_size)
    if args.method:
        model = get_tuned_model(bb, make_config(args.method, args.overrides), task.num_classes)
        if not isinstance(model, SideTuner):
            raise ConfigError(f"method {args.method!r} runs inside the backbone; its features cannot be cached")
        taps = model.tap_names()
    else:
        taps = [t.strip() for t in args.taps.split(",") if t.strip()]
    splits = None if args.splits == "all" else [s.strip() for s in args.splits.split(",") if s.strip()]
    cache, stats = extract_features(
        args.output,
        bb,
        task,
        taps,
        splits=splits,
        dtype="float16" if args.fp16 else None,
        chunk_size=args.chunk_size,
        batch_size=args.batch_size,
        device=resolve_device(args.device),
        amp=not args.no_amp,
        progress=not args.no_progress,
        flush_denormal=not args.keep_denormals,
    )
    print(f"feature cache {args.output}: {bb.name} on {task.name}, taps {cache.taps}, {cache.dtype}")
    print_table(
        stats,
        [("split", "split"), ("samples", "samples"), ("chunks", "chunks"), ("extracted", "chunks extracted now")],
    )
    return 0
