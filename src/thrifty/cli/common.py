"""Shared CLI plumbing: `-c/--config` (YAML/JSON defaults for any flag), repeated `--set key=value` method
options, argument groups for backbone / data / training, and saving the resolved config next to outputs."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from thrifty.errors import ConfigError
from thrifty.io import load_config_file
from thrifty.train.options import BACKBONE, DATA, TRAINING


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


def add_options(parser: argparse.ArgumentParser, options, required: bool = True) -> None:
    """Add a table of `thrifty.train.options.Option`s to `parser`, one argument group per option group."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for o in options:
        g = groups.get(o.group) or groups.setdefault(o.group, parser.add_argument_group(o.group))
        if o.is_switch:
            g.add_argument(o.flag, action="store_true", help=o.help)
        elif o.repeat:
            g.add_argument(o.flag, action="append", default=[], metavar=o.metavar, help=o.help)
        else:
            kw = {"type": o.type, "default": o.default, "help": o.help, "choices": o.choices, "metavar": o.metavar}
            g.add_argument(o.flag, required=o.required and required, **kw)


def add_backbone_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    add_options(parser, BACKBONE, required)


def add_data_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    add_options(parser, DATA, required)


def add_train_args(parser: argparse.ArgumentParser) -> None:
    add_options(parser, TRAINING)


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
        optimizer=args.optimizer,
        label_smoothing=args.label_smoothing,
        seed=args.seed,
        device=args.device,
        amp=not args.no_amp,
        select_on_val=args.select_on_val,
        progress=not args.no_progress,
        malloc=args.malloc,
        flush_denormal=not args.keep_denormals,
    )


def backbone_spec(args: argparse.Namespace):
    """The BackboneSpec of the backbone flags."""
    from thrifty.backbones import BackboneSpec

    return BackboneSpec(args.backbone, args.checkpoint, bool(args.random_init), args.image_size, args.max_length)


def backbone_for_run(args: argparse.Namespace, directory: str | None):
    """The backbone flags completed from the saved run in `directory` (its BackboneSpec): a flag left out takes
    the saved value; a flag that contradicts the saved value wins, with a warning on stderr."""
    import sys

    from thrifty.backbones import BackboneSpec
    from thrifty.tuners.base import saved_backbone_spec

    saved = saved_backbone_spec(directory) if directory else None
    if saved is None:
        if not args.backbone:
            raise ConfigError(f"pass --backbone: {directory or 'the command'} does not record which backbone it used")
        return backbone_spec(args)
    given = {
        "name": args.backbone,
        "checkpoint": args.checkpoint,
        "image_size": args.image_size,
        "max_length": args.max_length,
        "random_init": True if args.random_init else None,
    }
    for key, value in given.items():
        if value is not None and value != getattr(saved, key):
            flag = "--" + ("backbone" if key == "name" else key.replace("_", "-"))
            print(
                f"thrifty: {flag} {value} differs from {directory}'s {getattr(saved, key)}; using {value}",
                file=sys.stderr,
            )
    return BackboneSpec(**{**saved.to_dict(), **{k: v for k, v in given.items() if v is not None}})


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


CONFIG_FILE = "config.yaml"


def save_config(args: argparse.Namespace, directory: str, name: str = CONFIG_FILE) -> str:
    """The command's resolved flags as `directory/config.yaml` (`-c` takes it back); returns the path."""
    import yaml

    from thrifty.io import write_text

    os.makedirs(directory or ".", exist_ok=True)
    path = os.path.join(directory, name)
    write_text(path, yaml.safe_dump({"command": args.command, **resolved_config(args)}, sort_keys=True))
    return path


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    """`--json` means the same on every command: print the full result as JSON on stdout instead of the short
    human summary (files are written either way)."""
    parser.add_argument("--json", action="store_true", help="print the full result as JSON instead of a summary")


def emit(args: argparse.Namespace, data: Any, summary: str) -> None:
    """Print `summary` for people, or `data` as JSON with --json."""
    print(json.dumps(data, indent=2, default=str) if getattr(args, "json", False) else summary)


def print_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """Plain Markdown table; returns the text it printed."""
    text = format_table(rows, columns)
    print(text)
    return text


def format_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """Plain Markdown table of `rows` (column key, title); numbers formatted for reading."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
        if isinstance(v, int):
            return f"{v:,d}"
        return "-" if v is None else str(v)

    head = "| " + " | ".join(title for _, title in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(r.get(key)) for key, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def log_progress(no_progress: bool = False) -> None:
    """Long library steps report on stderr: the `thrifty` loggers at INFO (one line per step start and end) and
    their tqdm bars (thrifty.compress.progress). `no_progress`: warnings only, no bars."""
    import logging
    import sys

    logger = logging.getLogger("thrifty")
    if not any(getattr(h, "thrifty_cli", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        handler.thrifty_cli = True
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.WARNING if no_progress else logging.INFO)
