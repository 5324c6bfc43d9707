"""Run a grid of cells, each a separate `thrifty train` process, Make-style: what is complete is skipped.

A cell directory DIR/<task>/<method>/seed<k>/ holds
    cell.json       the cell's spec (method, seed, train flags, --set options) and its command line
    results.json    written by `thrifty train` when the run completes (status "complete")
    checkpoint.safetensors   present while a run is unfinished: the next grid run resumes it (--resume)
    failed.json     exit code, stderr tail and command of the last failed attempt (removed on success)
    stdout.log, stderr.log   the last attempt's output
Cells run one at a time in fresh processes, so a crash (or an out-of-memory kill) ends one cell, not the grid.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from thrifty.bench.suite import Cell, Suite
from thrifty.errors import ConfigError
from thrifty.io import write_json
from thrifty.runtime.child import child_env


CELL_SPEC = "cell.json"
FAILED = "failed.json"
RESULTS = "results.json"
CHECKPOINT = "checkpoint.safetensors"
MANIFEST = "suite.json"
STDERR_TAIL_LINES = 40

Launcher = Callable[[list[str], str, float | None], tuple[int, str]]


def read_json(path: str) -> dict[str, Any] | None:
    """The JSON object in `path`, or None if it is missing or unreadable (a half-written or foreign file)."""
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def cell_state(cell_dir: str, spec: dict[str, Any] | None = None) -> str:
    """'complete' | 'stale' (complete, but for another spec) | 'partial' (checkpoint, no results) | 'failed' |
    'missing'."""
    results = read_json(os.path.join(cell_dir, RESULTS))
    if results is not None and results.get("status") == "complete":
        recorded = read_json(os.path.join(cell_dir, CELL_SPEC))
        if spec is not None and recorded is not None and recorded.get("spec") != spec:
            return "stale"
        return "complete"
    if os.path.exists(os.path.join(cell_dir, CHECKPOINT)):
        return "partial"
    if os.path.exists(os.path.join(cell_dir, FAILED)):
        return "failed"
    return "missing"


def train_command(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "thrifty.cli.main", "train", *argv]


def launch_subprocess(argv: list[str], cell_dir: str, timeout: float | None) -> tuple[int, str]:
    """Run `thrifty train ARGV` in a fresh process, output to the cell's logs; -> (exit code, stderr tail)."""
    out_path, err_path = os.path.join(cell_dir, "stdout.log"), os.path.join(cell_dir, "stderr.log")
    with open(out_path, "w") as out, open(err_path, "w") as err:
        try:
            rc = subprocess.run(
                train_command(argv), stdout=out, stderr=err, env=child_env(), timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            err.write(f"\nthrifty bench: cell killed after its --cell-timeout of {timeout:.0f} s\n")
            rc = 124
    with open(err_path, errors="replace") as fh:
        tail = "".join(fh.readlines()[-STDERR_TAIL_LINES:])
    return rc, tail


def write_manifest(out_dir: str, suite: Suite) -> None:
    """Record the suite's layout in DIR/suite.json; refuse to mix two suites in one results folder."""
    path = os.path.join(out_dir, MANIFEST)
    old = read_json(path)
    if old is not None and old.get("name") != suite.name:
        raise ConfigError(
            f"{out_dir} holds results of suite {old.get('name')!r}, not {suite.name!r}; pick another --output"
        )
    write_json(path, suite.manifest())


def _children_cpu() -> float:
    """CPU seconds (user + system) of all finished child processes, grandchildren included."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _record_run(cell_dir: str, rc: int, wall: float, cpu: float, load: float) -> None:
    """Add the last attempt's exit code, wall-clock and CPU seconds (process tree) and the machine's 1-minute load
    average at its start (timings taken on a busy machine are inflated) to cell.json."""
    path = os.path.join(cell_dir, CELL_SPEC)
    data = read_json(path) or {}
    data["last_run"] = {
        "returncode": rc,
        "wall_seconds": round(wall, 3),
        "cpu_seconds": round(cpu, 3),
        "loadavg_at_start": round(load, 2),
        "finished": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    write_json(path, data)


def _fmt_secs(s: float) -> str:
    s = round(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def run_cells(
    cells: list[Cell],
    out_dir: str,
    *,
    launch: Launcher = launch_subprocess,
    rerun_stale: bool = False,
    retry_failed: bool = True,
    timeout: float | None = None,
    dry_run: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, int]:
    """Run every cell that is not complete; return counts per outcome ('complete' = skipped as done)."""
    n = len(cells)
    counts = {"complete": 0, "ran": 0, "failed": 0, "stale": 0, "skipped_failed": 0}
    todo = []
    for cell in cells:
        cell_dir = os.path.join(out_dir, cell.rel_dir())
        state = cell_state(cell_dir, cell.spec())
        skip = (
            state == "complete" or (state == "stale" and not rerun_stale) or (state == "failed" and not retry_failed)
        )
        todo.append((cell, cell_dir, state, "skip" if skip else "run"))
    # peak memory is measured once per task and method (its first seed): it does not depend on the seed, and each
    # measurement costs a fresh process that loads the backbone again
    first_seed: dict[tuple[str, str], int] = {}
    for cell in cells:
        key = (cell.task, cell.label)
        first_seed[key] = min(first_seed.get(key, cell.seed), cell.seed)
    to_run = sum(1 for *_, action in todo if action == "run")
    log(f"thrifty bench: {n} cells, {n - to_run} already done or skipped, {to_run} to run -> {out_dir}")
    start, ran_secs, ran = time.perf_counter(), 0.0, 0
    for i, (cell, cell_dir, state, action) in enumerate(todo, 1):
        name = f"[{i}/{n}] {cell.task} / {cell.label} / seed {cell.seed}"
        if action == "skip":
            key = {"complete": "complete", "stale": "stale"}.get(state, "skipped_failed")
            counts[key] += 1
            note = {
                "complete": "complete, skipped",
                "stale": "STALE: complete for a different spec (see cell.json); kept. --rerun-stale reruns it",
                "failed": "failed before, skipped (--no-retry-failed)",
            }[state]
            log(f"{name}: {note}")
            continue
        argv = [*cell.argv(cell_dir), "--no-progress"]
        if cell.seed != first_seed[(cell.task, cell.label)]:
            argv.append("--no-peak-memory")
        if state == "partial":
            recorded = read_json(os.path.join(cell_dir, CELL_SPEC)) or {}
            argv.append("--resume" if recorded.get("spec") == cell.spec() else "--overwrite")
        elif state in ("stale", "failed") or os.path.exists(os.path.join(cell_dir, RESULTS)):
            argv.append("--overwrite")
        if dry_run:
            log(f"{name}: would run: thrifty train {' '.join(argv)}")
            continue
        os.makedirs(cell_dir, exist_ok=True)
        write_json(
            os.path.join(cell_dir, CELL_SPEC),
            {"task": cell.task, "group": cell.group, "label": cell.label, "spec": cell.spec(), "argv": argv},
        )
        what = {"partial": "resuming", "stale": "rerunning (spec changed)", "failed": "retrying"}.get(state, "running")
        log(f"{name}: {what} ...")
        t0, cpu0, load = time.perf_counter(), _children_cpu(), os.getloadavg()[0]
        try:
            rc, tail = launch(argv, cell_dir, timeout)
        except KeyboardInterrupt:
            log(f"{name}: interrupted; rerun the same command to resume the grid (this cell resumes too)")
            raise
        secs, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
        _record_run(cell_dir, rc, secs, cpu, load)
        ran_secs, ran = ran_secs + secs, ran + 1
        results = read_json(os.path.join(cell_dir, RESULTS)) if rc == 0 else None
        if rc == 0 and results is not None and results.get("status") == "complete":
            counts["ran"] += 1
            if os.path.exists(os.path.join(cell_dir, FAILED)):
                os.remove(os.path.join(cell_dir, FAILED))
            key = (results.get("objective") or {}).get("selection_metric", "accuracy")
            value = (results.get("metrics") or {}).get(f"test_{key}")
            outcome = f"done in {_fmt_secs(secs)}, test {key} {value:.4g}" if value is not None else "done"
        else:
            counts["failed"] += 1
            if rc == 0:
                rc, tail = -1, tail + "\nthrifty bench: exit code 0 but no complete results.json was written\n"
            write_json(
                os.path.join(cell_dir, FAILED),
                {
                    "returncode": rc,
                    "stderr_tail": tail,
                    "command": train_command(argv),
                    "seconds": secs,
                    "finished": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                },
            )
            last = tail.strip().splitlines()[-1] if tail.strip() else "no stderr"
            outcome = f"FAILED (exit {rc}) after {_fmt_secs(secs)}: {last}  [{os.path.join(cell_dir, FAILED)}]"
        left = to_run - ran
        eta = ran_secs / ran * left
        log(f"{name}: {outcome} | elapsed {_fmt_secs(time.perf_counter() - start)}, ETA {_fmt_secs(eta)}")
    return counts
