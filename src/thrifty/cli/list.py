"""`thrifty list`: the registered names of one kind (backbones, methods, datasets, compressors, objectives),
one per line with a short description; `--json` prints them as a JSON object instead."""

from __future__ import annotations

import argparse
import json
import re


KINDS = ("backbones", "methods", "datasets", "compressors", "objectives")


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("list", help="list registered backbones, methods, datasets, compressors or objectives")
    p.add_argument("kind", choices=KINDS, help="what to list")
    p.add_argument("--json", action="store_true", help="print {name: description} as JSON")
    return p


def registered(kind: str) -> dict[str, str]:
    """{name: one-line description} of every registered entry of `kind`."""
    if kind == "backbones":
        from thrifty.backbones import BACKBONES, available_backbones

        return {
            (f"{n}:<...>" if BACKBONES.get(n).takes_argument else n): BACKBONES.get(n).help
            for n in available_backbones()
        }
    if kind == "methods":
        from thrifty.tuners import available_methods, get_method

        return {n: _summary(*get_method(n)) for n in available_methods()}
    if kind == "datasets":
        from thrifty.data import DATASETS, available_datasets

        return {(f"{n}:PATH" if DATASETS.get(n).takes_path else n): DATASETS.get(n).help for n in available_datasets()}
    if kind == "objectives":
        from thrifty.objectives import OBJECTIVES, available_objectives

        return {n: _summary(OBJECTIVES.get(n)) for n in available_objectives()}
    from thrifty.compress import available_compressors, get_compressor

    return {n: _summary(get_compressor(n).config_cls) for n in available_compressors()}


def _summary(*classes: type, limit: int = 100) -> str:
    """The first sentence of the first class docstring written by hand (dataclasses make one up)."""
    for cls in classes:
        doc = " ".join((cls.__doc__ or "").split())
        if doc and not doc.startswith(f"{cls.__name__}("):
            sentence = re.split(r"(?<!\bal)\.\s+(?=[A-Z])", doc)[0].rstrip(".")
            return sentence if len(sentence) <= limit else sentence[: limit - 3] + "..."
    return ""


def run(args: argparse.Namespace) -> int:
    entries = registered(args.kind)
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    width = max(len(n) for n in entries) if entries else 0
    for name, help in entries.items():
        print(f"{name:<{width}}  {help}".rstrip())
    return 0
