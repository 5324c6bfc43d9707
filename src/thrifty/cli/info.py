"""`thrifty info`: parameter counts and the real serialized adapter size of a method, without training.

The backbone is built from its architecture (random init unless --checkpoint): weights do not change counts."""

from __future__ import annotations

import argparse
import json
import tempfile


def register(sub) -> argparse.ArgumentParser:
    from thrifty.cli.common import add_backbone_args, add_config_args

    p = sub.add_parser("info", help="trainable/total parameters and adapter bytes", description=__doc__)
    add_config_args(p)
    add_backbone_args(p)
    p.add_argument("--method", required=True)
    p.add_argument("--num-classes", type=int, required=True)
    p.add_argument("--json", action="store_true", help="print JSON")
    return p


def method_info(backbone, method: str, overrides: dict, num_classes: int) -> dict:
    """Counts + bytes of the saved adapter (adapter_model.safetensors) for `method` on `backbone`."""
    from thrifty.metrics import dir_bytes
    from thrifty.tuners import get_tuned_model, make_config

    model = get_tuned_model(backbone, make_config(method, overrides), num_classes)
    d = model.describe()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        d["adapter_bytes"] = dir_bytes(tmp)
    d["backbone"] = backbone.name
    d["num_classes"] = num_classes
    return d


def run(args: argparse.Namespace) -> int:
    from thrifty.backbones import load_backbone
    from thrifty.cli.common import backbone_spec

    spec = backbone_spec(args)
    bb = load_backbone(spec.replace(random_init=spec.checkpoint is None or spec.random_init))  # architecture only
    d = method_info(bb, args.method, args.overrides, args.num_classes)
    if args.json:
        print(json.dumps(d, indent=2, sort_keys=True))
    else:
        print(f"{d['method']} on {d['backbone']} ({args.num_classes} classes)")
        for key in ("adapter_params", "head_params", "trainable_params", "total_params", "adapter_bytes"):
            print(f"  {key:17s} {d[key]:>14,d}")
        print(
            "  trainable_params = adapter_params + head_params; adapter_bytes = adapter_model.safetensors "
            "(adapter + head)"
        )
    return 0
