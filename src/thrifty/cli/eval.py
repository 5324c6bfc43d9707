"""`thrifty eval`: evaluate a saved adapter directory on a task's test split (or another split)."""

from __future__ import annotations

import argparse
import json

from thrifty.cli.common import add_backbone_args, add_config_args, add_data_args, backbone_kwargs


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help="evaluate a saved adapter", description=__doc__)
    add_config_args(p)
    add_backbone_args(p)
    add_data_args(p)
    p.add_argument("--adapter", required=True, help="directory with adapter_config.json + adapter_model.safetensors")
    p.add_argument("--split", default="test", help="role or split name: test | val | train | train800 | ...")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="seed of the 1k split draw (use the training seed)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="also write the result to this file")
    return p


def run(args: argparse.Namespace) -> int:
    from thrifty.backbones import load_backbone
    from thrifty.data import PROTOCOLS, load_data
    from thrifty.io import write_json
    from thrifty.train.loop import evaluate, resolve_device
    from thrifty.tuners import load_tuned_model

    bb = load_backbone(args.backbone, **backbone_kwargs(args))
    task = load_data(
        args.data,
        bb.preprocess,
        seed=args.seed if args.split_seed is None else args.split_seed,
        test_size=args.test_size,
    )
    model = load_tuned_model(bb, args.adapter)
    split = task.split(args.split) if args.split in PROTOCOLS[task.protocol] else task.splits[args.split]
    res = evaluate(model.to(resolve_device(args.device)), split, args.batch_size, progress=True)
    out = {"adapter": args.adapter, "data": task.name, "split": args.split, **res}
    print(json.dumps(out, indent=2))
    if args.json:
        write_json(args.json, out)
    return 0
