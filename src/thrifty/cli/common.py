"""Shared CLI plumbing: `-c/--config` (YAML/JSON defaults for any flag), repeated `--set key=value` method
options, argument groups for backbone / data / training, and saving the resolved config next to outputs."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from thrifty.errors import ConfigError
from thrifty.train.allocator import MALLOC_MODES


def load_config_file(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist")
    with open(path) as fh:
        text = fh.read()
    if path.endswith((".yaml", ".yml")):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON ({exc}); YAML files must end in .yaml/.yml") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of option names to values")
    return data


def parse_sets(items: list[str] | None) -> dict[str, str]:
    """['r=8', 'alpha=16'] -> {'r': '8', 'alpha': '16'}."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        out[key.strip().replace("-", "_")] = value.strip()
    return out


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c",
        "--config",
        help="YAML or JSON file of defaults for any flag (flags override it); its `set:` mapping gives method options",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="method option, repeatable (e.g. --set r=8 --set lora_alpha=16)",
    )


def add_backbone_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    g = parser.add_argument_group("backbone")
    g.add_argument("--backbone", required=required, help="timm:<name> | hf:<id or dir> | minilm | efficientnet-lite0")
    g.add_argument("--checkpoint", help="local weights: .safetensors, .pth, Google ViT .npz, or a HF model dir")
    g.add_argument("--random-init", action="store_true", help="random weights (no download); for smoke tests")
    g.add_argument("--max-length", type=int, help="text backbones: tokens per sample (default 128)")
    g.add_argument("--image-size", type=int, help="image backbones: input resolution (default: the model's)")


def add_data_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    g = parser.add_argument_group("data")
    g.add_argument(
        "--data",
        required=required,
        help="vtab:PATH/vtab-1k/<task> | fashion-mnist | digits | reviews | imagefolder:PATH; "
        "append :1k for the few-sample protocol",
    )
    g.add_argument("--test-size", type=int, help="cap the test split (stratified subsample)")
    g.add_argument("--split-seed", type=int, help="seed of the 1k split draw (default: --seed)")


def add_train_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=10)
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--weight-decay", type=float, default=1e-4)
    g.add_argument("--warmup-epochs", type=float, default=1.0)
    g.add_argument("--min-lr", type=float, default=1e-6)
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0 disables)")
    g.add_argument("--label-smoothing", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--no-amp", action="store_true", help="disable bf16 autocast on CUDA")
    g.add_argument(
        "--select-on-val",
        action="store_true",
        help="train on the tuning split (train800), keep the best epoch on val (val200), report test",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument(
        "--malloc",
        choices=MALLOC_MODES,
        default="tuned",
        help="CPU: `tuned` keeps freed large blocks for reuse (glibc; fewer page faults per step), `system` leaves "
        "the allocator alone",
    )
    g.add_argument(
        "--keep-denormals",
        action="store_true",
        help="CPU: do not flush subnormal floats to zero during training (slower once attention sharpens)",
    )


def train_config(args: argparse.Namespace):
    from thrifty.train import TrainConfig

    return TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs,
        min_lr=args.min_lr,
        grad_clip=args.grad_clip or None,
        label_smoothing=args.label_smoothing,
        seed=args.seed,
        device=args.device,
        amp=not args.no_amp,
        select_on_val=args.select_on_val,
        progress=not args.no_progress,
        malloc=args.malloc,
        flush_denormal=not args.keep_denormals,
    )


def backbone_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "checkpoint": args.checkpoint,
        "pretrained": False if args.random_init else None,
        "max_length": args.max_length,
        "image_size": args.image_size,
    }


def parse_with_config(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse argv; a `-c FILE` supplies defaults for the subcommand's flags (flags on the command line win)."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("-c", "--config")
    known, _ = pre.parse_known_args(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    sub = getattr(parser, "subcommands", {}).get(command)
    file_sets: dict[str, str] = {}
    if known.config and sub is not None:
        data = load_config_file(known.config)
        file_sets = {str(k): str(v) for k, v in (data.pop("set", None) or {}).items()}
        actions = {a.dest: a for a in sub._actions}
        defaults = {}
        for key, value in data.items():
            dest = key.replace("-", "_")
            if dest not in actions or dest in ("help", "config", "set"):
                raise ConfigError(f"{known.config}: unknown option {key!r} for `thrifty {command}`")
            defaults[dest] = value
            actions[dest].required = False  # the file provides it
        sub.set_defaults(**defaults)
    args = parser.parse_args(argv)
    args.overrides = {**file_sets, **parse_sets(getattr(args, "set", None))}
    return args


def resolved_config(args: argparse.Namespace) -> dict[str, Any]:
    skip = {"func", "config", "set"}
    return {k: v for k, v in vars(args).items() if k not in skip}


def print_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """Plain Markdown table; returns the text it printed."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
        if isinstance(v, int):
            return f"{v:,d}"
        return "-" if v is None else str(v)

    head = "| " + " | ".join(title for _, title in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(r.get(key)) for key, _ in columns) + " |" for r in rows]
    text = "\n".join([head, sep, *body])
    print(text)
    return text
