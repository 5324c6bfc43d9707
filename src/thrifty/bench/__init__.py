"""Benchmark harness: suites (task x method x seed grids of `thrifty train` runs), a Make-style runner, and
reports (Markdown/CSV tables with group means and both overall means, accuracy-vs-cost plots)."""

from thrifty.bench.collect import MEAN_OF_GROUPS, MEAN_OF_TASKS, aggregate, collect
from thrifty.bench.document import build_report
from thrifty.bench.plots import pareto_front
from thrifty.bench.runner import cell_state, run_cells
from thrifty.bench.suite import Cell, Suite, expand, find_suite, load_suite, parse_suite


__all__ = [
    "MEAN_OF_GROUPS",
    "MEAN_OF_TASKS",
    "Cell",
    "Suite",
    "aggregate",
    "build_report",
    "cell_state",
    "collect",
    "expand",
    "find_suite",
    "load_suite",
    "pareto_front",
    "parse_suite",
    "run_cells",
]
