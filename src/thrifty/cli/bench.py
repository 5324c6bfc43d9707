"""`thrifty bench`: run a suite (or your own grid file) of methods x tasks x seeds, each cell a separate
`thrifty train` process writing DIR/<task>/<method>/seed<k>/results.json. Rerunning the same command skips
complete cells, resumes half-done ones (--resume) and retries failed ones, so an interrupted grid just continues.
Ends with `thrifty report DIR`.

Examples:
  thrifty bench --suite smoke --output runs/smoke
  thrifty bench --suite offline --output runs/offline --methods linear,lora --seeds 0
  thrifty bench --suite vtab1k --data-root /data/vtab-1k --checkpoint ViT-B_16.npz --output runs/vtab
"""

from __future__ import annotations

import argparse
import sys


def _csv(text: str | None) -> list[str] | None:
    return [x.strip() for x in text.split(",") if x.strip()] if text else None


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "bench",
        help="run a benchmark suite or grid (methods x tasks x seeds) and report it",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--suite", help="suite name in benchmarks/suites/ (vtab1k, offline, smoke) or a file path")
    src.add_argument("--grid", help="your own grid file (same YAML schema as the suites)")
    p.add_argument("--output", required=True, help="results folder (DIR/<task>/<method>/seed<k>/)")
    p.add_argument("--data-root", help="fills {data_root} in the suite (vtab1k: the folder holding vtab-1k/<task>)")
    p.add_argument("--checkpoint", help="fills {checkpoint} (vtab1k: the Google ViT-B_16.npz)")
    p.add_argument("--methods", help="comma list of suite rows or any registered method (default: the suite's)")
    p.add_argument("--tasks", help="comma list of the suite's tasks (default: all)")
    p.add_argument("--seeds", help="comma list of integer seeds (default: the suite's)")
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="`thrifty train` flag for every cell, last word (e.g. --override epochs=1 for a timing run)",
    )
    p.add_argument("--rerun-stale", action="store_true", help="rerun complete cells whose recorded spec differs")
    p.add_argument("--no-retry-failed", action="store_true", help="leave cells that failed before as failed")
    p.add_argument("--cell-timeout", type=float, help="seconds before a cell is killed and recorded as failed")
    p.add_argument("--dry-run", action="store_true", help="print what would run, run nothing")
    p.add_argument("--no-report", action="store_true", help="do not build the report at the end")
    return p


def _check_methods(suite, labels: list[str] | None) -> list[str]:
    """Rows to run: explicit ones must resolve to registered methods; suite rows whose method is not registered
    (e.g. a method from a branch not installed) are skipped with a warning."""
    from thrifty.errors import ConfigError
    from thrifty.tuners import available_methods

    known = set(available_methods())
    out = []
    for label in labels or list(suite.methods):
        method = str((suite.methods.get(label) or {}).get("method", label))
        if method in known:
            out.append(label)
        elif labels:
            raise ConfigError(
                f"method {method!r} (row {label!r}) is not registered; available: {', '.join(sorted(known))}"
            )
        else:
            print(
                f"thrifty bench: WARNING: skipping row {label!r}: method {method!r} is not registered", file=sys.stderr
            )
    if not out:
        raise ConfigError("no method to run")
    return out


def _sigterm_to_interrupt(signum, frame) -> None:
    # `kill PID` of the harness must also end the running cell (subprocess.run kills its child on an exception)
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    import os
    import signal

    from thrifty.bench import build_report, expand, find_suite, load_suite, run_cells
    from thrifty.bench.runner import write_manifest
    from thrifty.cli.common import parse_sets
    from thrifty.errors import ConfigError

    path = find_suite(args.suite) if args.suite else args.grid
    if args.grid and not os.path.isfile(args.grid):
        raise ConfigError(f"grid file {args.grid} does not exist")
    suite = load_suite(path)
    try:
        seeds = [int(s) for s in _csv(args.seeds)] if args.seeds else None
    except ValueError:
        raise ConfigError(f"--seeds expects integers separated by commas, got {args.seeds!r}") from None
    cells = expand(
        suite,
        methods=_check_methods(suite, _csv(args.methods)),
        tasks=_csv(args.tasks),
        seeds=seeds,
        data_root=args.data_root,
        checkpoint=args.checkpoint,
        overrides=parse_sets(args.override),
    )
    os.makedirs(args.output, exist_ok=True)
    if not args.dry_run:
        write_manifest(args.output, suite)

    signal.signal(signal.SIGTERM, _sigterm_to_interrupt)

    def log(line: str) -> None:
        print(line, flush=True)

    counts = run_cells(
        cells,
        args.output,
        rerun_stale=args.rerun_stale,
        retry_failed=not args.no_retry_failed,
        timeout=args.cell_timeout,
        dry_run=args.dry_run,
        log=log,
    )
    if args.dry_run:
        return 0
    log(
        f"thrifty bench: {counts['ran']} ran, {counts['complete']} were complete, {counts['failed']} failed"
        + (f", {counts['stale']} stale kept" if counts["stale"] else "")
    )
    if not args.no_report:
        out = build_report(args.output)
        log(out["table"])
        log(f"report: {out['markdown']}  {out['csv']}  plots: {', '.join(out['plots'])}")
    return 1 if counts["failed"] else 0
