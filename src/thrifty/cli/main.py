"""`thrifty`: one console script, one module per subcommand (each exposes `register(subparsers)`)."""

from __future__ import annotations

import argparse
import importlib
import sys

from thrifty.errors import ThriftyError


COMMANDS = [
    "train",
    "btm",
    "eval",
    "info",
    "profile",
    "demo",
    "extract",
    "export-bin",
    "bench",
    "report",
    "serve",
    "quantize",
    "compress",
    "list",
]


def build_parser() -> argparse.ArgumentParser:
    from thrifty.version import __version__

    parser = argparse.ArgumentParser(
        prog="thrifty",
        description="Adapt and compress pretrained models on small "
        "budgets. `thrifty <command> --help` for each command.",
    )
    parser.add_argument("--version", action="version", version=f"thrifty {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.subcommands = {}
    for name in COMMANDS:
        module = importlib.import_module(f"thrifty.cli.{name.replace('-', '_')}")
        p = module.register(sub)
        p.set_defaults(func=module.run)
        parser.subcommands[name] = p
    return parser


def main(argv: list[str] | None = None) -> int:
    from thrifty.cli.common import parse_with_config
    from thrifty.runtime.quiet import quiet_known_warnings

    quiet_known_warnings()
    parser = build_parser()
    try:
        args = parse_with_config(parser, argv)
        return int(args.func(args) or 0)
    except ThriftyError as exc:
        print(f"thrifty {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command with --resume to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
