"""`thrifty extract`: run the frozen backbone once over a task's splits and store the taps a side method reads
(memory-mapped .npy chunks + manifest.json with checksums). Resumable: run it again after an interruption; it
also re-extracts any chunk that is missing, truncated or corrupt. Train from it with `thrifty train --cache DIR`.
Before writing it prints the size (exact) and time (from a probe) of the extraction, and refuses (DiskSpaceError)
when the disk cannot hold it, unless --skip-disk-check; results.json in the cache records the bytes written."""

from __future__ import annotations

import argparse
import os
import time

from thrifty.cli.common import (
    add_backbone_args,
    add_config_args,
    add_data_args,
    backbone_spec,
    log_progress,
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
    g.add_argument(
        "--splits",
        help="comma-separated split names, or `all` (with :1k, train800 and val200 then repeat train800val200's "
        "samples); default: the splits `thrifty train` reads (train and test; with --select-on-val train800, "
        "val200 and test)",
    )
    g.add_argument("--select-on-val", action="store_true", help="default splits for `train --select-on-val`")
    g.add_argument("--output", required=True, help="cache directory (created, or completed if it exists)")
    g.add_argument("--fp16", action="store_true", help="store float16 (half the disk; training is then approximate)")
    g.add_argument("--chunk-size", type=int, default=256, help="samples per chunk file")
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--seed", type=int, default=0, help="seed of the 1k split draw (use the training seed)")
    g.add_argument("--device", default="auto")
    g.add_argument("--no-amp", action="store_true", help="disable bf16 autocast on CUDA")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument(
        "--skip-disk-check",
        action="store_true",
        help="extract even when the estimate (printed first) exceeds the free disk space (default: refuse)",
    )
    g.add_argument(
        "--keep-denormals",
        action="store_true",
        help="CPU: do not flush subnormal floats to zero (training flushes them unless it has --keep-denormals too)",
    )
    return p


def run(args: argparse.Namespace) -> int:
    from thrifty.backbones import load_backbone
    from thrifty.data import PROTOCOLS, load_data
    from thrifty.errors import ConfigError
    from thrifty.features import extract_features, roles_for
    from thrifty.features.budget import human_bytes, human_seconds
    from thrifty.io import write_json
    from thrifty.runtime import resolve_device
    from thrifty.tuners import get_tuned_model, make_config
    from thrifty.tuners.side import SideTuner

    if bool(args.method) == bool(args.taps):
        raise ConfigError("pass exactly one of --method (its taps) or --taps")
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
    if args.splits is None:
        splits = sorted({PROTOCOLS[task.protocol][r] for r in roles_for(args.select_on_val)})
    elif args.splits == "all":
        splits = None
    else:
        splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    log_progress(args.no_progress)
    t0 = time.perf_counter()
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
        disk_check=not args.skip_disk_check,
    )
    written, total = sum(s["bytes_written"] for s in stats), cache.bytes()
    results = {
        "backbone": bb.describe(),
        "data": task.name,
        "taps": cache.taps,
        "dtype": cache.dtype,
        "splits": stats,
        "estimate": cache.estimate.to_dict(),
        "bytes_written": written,
        "bytes": total,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    write_json(os.path.join(args.output, "results.json"), results)
    save_config(args, args.output)  # after the extraction: a refused one leaves no folder
    print(f"feature cache {args.output}: {bb.name} on {task.name}, taps {cache.taps}, {cache.dtype}")
    print_table(
        stats,
        [("split", "split"), ("samples", "samples"), ("chunks", "chunks"), ("extracted", "chunks extracted now")],
    )
    print(f"wrote {human_bytes(written)} (cache {human_bytes(total)}) in {human_seconds(results['seconds'])}")
    return 0
