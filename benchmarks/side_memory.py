"""Memory and step time of side-tuning vs injected PEFT: one `thrifty profile` run, ratios against LoRA.

    python benchmarks/side_memory.py        # ViT-B/16 (random init), batch 8: full,lora,adaptformer,dtl,last
    python benchmarks/side_memory.py --backbone timm:test_vit --image-size 64 --batch-size 4   # quick check

Targets (issue 4): bytes saved for backward of LAST <= 0.25x LoRA's and of DTL <= 0.6x LoRA's; step time of
LAST <= 0.6x LoRA's, all from the same run. Each method runs in a fresh process (thrifty.cli.profile). Prints a
table and writes JSON (default runs/benchmarks/side_memory.json).
"""

from __future__ import annotations

import argparse
import sys

import torch

from thrifty.backbones import BackboneSpec
from thrifty.cli.common import parse_sets, print_table
from thrifty.cli.profile import profile_methods
from thrifty.io import write_json
from thrifty.metrics import environment


TARGETS = [  # (method, metric, max ratio to LoRA)
    ("last", "saved_activation_bytes", 0.25),
    ("dtl", "saved_activation_bytes", 0.6),
    ("last", "step_seconds", 0.6),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="timm:vit_base_patch16_224")
    p.add_argument("--image-size", type=int)
    p.add_argument("--methods", default="full,lora,adaptformer,dtl,last")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--steps", type=int, default=2, help="timed steps per method after one warm-up step")
    p.add_argument("--device", default="auto")
    p.add_argument("--set", action="append", default=[], help="method options, e.g. last.r=8 (see thrifty profile)")
    p.add_argument("--json", default="runs/benchmarks/side_memory.json")
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    res = profile_methods(
        BackboneSpec(args.backbone, random_init=True, image_size=args.image_size),  # bytes/time do not need weights
        methods,
        batch_size=args.batch_size,
        num_classes=args.num_classes,
        steps=args.steps,
        overrides=parse_sets(args.set),
        device=args.device,
    )
    lora = res.get("lora")
    on_cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    rows = []
    for m, r in res.items():
        row = {
            "method": m,
            **r,
            "saved_MiB": r["saved_activation_bytes"] / 2**20,
            "peak_MiB": r["peak_memory_bytes"] / 2**20,
        }
        if lora:  # CPU peak = RSS growth of a warmed-up process: too coarse to compare, so no ratio on CPU
            keys = ("saved_activation_bytes", "step_seconds") + (("peak_memory_bytes",) if on_cuda else ())
            for key in keys:
                row[f"{key}/lora"] = r[key] / max(1e-12, lora[key])
        rows.append(row)
    print_table(
        rows,
        [
            ("method", "method"),
            ("adapter_params", "adapter params"),
            ("saved_MiB", "saved for backward (MiB)"),
            ("saved_activation_bytes/lora", "saved / LoRA"),
            ("peak_MiB", "peak (MiB)"),
            ("peak_memory_bytes/lora", "peak / LoRA"),
            ("step_seconds", "s / step"),
            ("step_seconds/lora", "step / LoRA"),
        ],
    )
    checks = []
    if lora:
        for method, key, limit in TARGETS:
            if method in res:
                ratio = res[method][key] / max(1e-12, lora[key])
                checks.append({"method": method, "metric": key, "ratio": ratio, "target": limit, "ok": ratio <= limit})
                print(
                    f"{method} {key} / lora = {ratio:.3f} (target <= {limit}): {'PASS' if ratio <= limit else 'FAIL'}"
                )
    write_json(
        args.json,
        {
            "backbone": args.backbone,
            "batch_size": args.batch_size,
            "methods": res,
            "checks": checks,
            "env": environment(args.device if args.device != "auto" else "cpu"),
            "command": "python benchmarks/side_memory.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        },
    )
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
