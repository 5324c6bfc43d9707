"""`thrifty profile`: one training step of each method on random inputs of the backbone's input shape.

Each method runs in a fresh process (so peak memory is clean). Reports bytes saved for backward (exact),
peak memory (CUDA max allocated, or CPU resident-set growth), seconds per step, trainable parameters."""

from __future__ import annotations

import argparse
import os

from thrifty.backbones import BackboneSpec
from thrifty.cli.common import backbone_spec, emit, format_table, save_config


def register(sub) -> argparse.ArgumentParser:
    from thrifty.cli.common import add_backbone_args, add_config_args, add_json_flag

    p = sub.add_parser("profile", help="memory and time of one training step per method", description=__doc__)
    add_config_args(p)
    add_backbone_args(p)
    p.add_argument("--methods", required=True, help="comma-separated, e.g. linear,lora,full")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    p.add_argument("--device", default="auto")
    p.add_argument("--output", help="write the per-method results to this JSON file (config.yaml beside it)")
    add_json_flag(p)
    return p


def profile_methods(
    backbone: BackboneSpec,
    methods: list[str],
    *,
    batch_size: int,
    num_classes: int,
    steps: int,
    overrides: dict[str, str],
    device: str,
) -> dict[str, dict]:
    """Method options apply to every method that has them; `method.key=value` targets one method."""
    import torch

    from thrifty.train.measure import peak_step_memory_subprocess
    from thrifty.tuners import get_method

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    out = {}
    for m in methods:
        config_cls, _ = get_method(m)
        fields = set(config_cls.__dataclass_fields__) | set(config_cls.aliases)
        ov = {k.split(".", 1)[1]: v for k, v in overrides.items() if k.startswith(f"{m}.")}
        ov.update({k: v for k, v in overrides.items() if "." not in k and k in fields})
        spec = {
            "backbone": backbone.to_dict(),
            "method": m,
            "overrides": ov,
            "num_classes": num_classes,
            "batch_size": batch_size,
            "timed_steps": steps,
            "device": device,
            "threads": torch.get_num_threads(),
        }
        print(f"profiling {m} ...", flush=True)
        out[m] = peak_step_memory_subprocess(spec)
    return out


def run(args: argparse.Namespace) -> int:
    from thrifty.io import write_json
    from thrifty.metrics import environment

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    res = profile_methods(
        backbone_spec(args).replace(random_init=args.checkpoint is None),  # random weights unless a checkpoint
        methods,
        batch_size=args.batch_size,
        num_classes=args.num_classes,
        steps=args.steps,
        overrides=args.overrides,
        device=args.device,
    )
    rows = [
        {"method": m, **r, "saved_MB": r["saved_activation_bytes"] / 2**20, "peak_MB": r["peak_memory_bytes"] / 2**20}
        for m, r in res.items()
    ]
    table = format_table(
        rows,
        [
            ("method", "method"),
            ("trainable_params", "trainable params"),
            ("saved_MB", "saved for backward (MiB)"),
            ("peak_MB", "peak memory (MiB)"),
            ("step_seconds", "s / step"),
        ],
    )
    data = {
        "backbone": args.backbone,
        "batch_size": args.batch_size,
        "methods": res,
        "env": environment(args.device if args.device != "auto" else "cpu"),
    }
    emit(args, data, table)
    if args.output:
        write_json(args.output, data)
        save_config(args, os.path.dirname(args.output), os.path.basename(args.output) + ".config.yaml")
    return 0
