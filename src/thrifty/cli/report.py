"""`thrifty report DIR`: tables (Markdown + CSV) and accuracy-vs-cost plots from a `thrifty bench` results
folder; `--docs docs/benchmarks.md` also writes a docs page with the plots copied beside it."""

from __future__ import annotations

import argparse


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("report", help="tables and plots from a bench results folder", description=__doc__)
    p.add_argument("dir", help="results folder written by `thrifty bench --output DIR`")
    p.add_argument("--out", help="where the report files go (default: DIR/report)")
    p.add_argument("--docs", help="also write this Markdown page (e.g. docs/benchmarks.md) with its plots")
    return p


def run(args: argparse.Namespace) -> int:
    import os

    from thrifty.bench import build_report
    from thrifty.errors import ConfigError

    if not os.path.isdir(args.dir):
        raise ConfigError(f"results folder {args.dir} does not exist; run `thrifty bench --output {args.dir}` first")
    out = build_report(args.dir, report_dir=args.out, docs=args.docs)
    print(out["table"])
    print(f"\nwrote {out['markdown']}, {out['csv']}, {out['cells_csv']}")
    print("plots: " + ", ".join(out["plots"]))
    if out["docs"]:
        print(f"docs: {out['docs']}")
    return 0
