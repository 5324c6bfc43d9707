"""Read a bench results folder and aggregate it: per-task mean ± std over seeds, group means and both overall
means (side-tuning.md §0.1: the "VTAB mean" is either the mean of the group means or the plain mean of tasks).

Aggregates are computed per seed and then summarised over seeds, so their ± is the spread of the aggregate
itself; the value shown is the mean of the per-task means (identical when every seed is complete). A mean is
None (shown "n/a") when any of its tasks has no complete seed.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from thrifty.bench.runner import CELL_SPEC, FAILED, MANIFEST, RESULTS, cell_state, read_json


COSTS = (
    "trainable_params",
    "adapter_params",
    "adapter_bytes",
    "saved_activation_bytes",
    "peak_memory_bytes",
    "seconds_per_epoch",
    "train_seconds",
)
MEAN_OF_GROUPS = "mean of group means"
MEAN_OF_TASKS = "mean of tasks"


@dataclass
class CellResult:
    task: str
    label: str
    seed: int
    state: str  # complete | failed | partial (checkpoint, no results) | missing
    results: dict[str, Any] | None = None
    failure: dict[str, Any] | None = None
    load: float | None = None  # 1-minute load average when the harness started the cell
    run: dict[str, Any] = field(default_factory=dict)  # the harness's last attempt: wall/cpu seconds, exit code

    @property
    def ok(self) -> bool:
        return self.state == "complete" and self.results is not None

    @property
    def metric(self) -> str:
        """The run's headline metric: its objective's selection metric (accuracy for runs that predate it)."""
        return ((self.results or {}).get("objective") or {}).get("selection_metric", "accuracy")

    @property
    def score(self) -> float | None:
        """The headline metric on test (in % for metrics in [0, 1], see Objective.percent), or None."""
        if not self.ok:
            return None
        value = (self.results.get("metrics") or {}).get(f"test_{self.metric}")
        percent = (self.results.get("objective") or {}).get("percent", True)
        return None if value is None else (100.0 if percent else 1.0) * float(value)

    def cost(self, key: str) -> float | None:
        if not self.ok:
            return None
        metrics = self.results.get("metrics") or {}
        if key == "train_seconds":
            hist = self.results.get("history") or []
            return float(sum(h.get("seconds", 0.0) for h in hist)) if hist else None
        v = metrics.get(key)
        return None if v is None else float(v)


@dataclass
class Stat:
    """mean ± std over `n` values (std: sample std, ddof=1; None for n < 2)."""

    mean: float | None
    std: float | None = None
    n: int = 0

    @classmethod
    def of(cls, values: list[float]) -> Stat:
        if not values:
            return cls(None, None, 0)
        m = sum(values) / len(values)
        sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
        return cls(m, sd, len(values))


@dataclass
class TaskCell:
    """All seeds of one (task, method): accuracy stats and the failed / unfinished seeds."""

    stat: Stat
    seeds: list[int]
    failed: list[int] = field(default_factory=list)
    unfinished: list[int] = field(default_factory=list)

    @property
    def status(self) -> str:
        if self.stat.n:
            return "ok"
        if self.failed:
            return "failed"
        return "unfinished" if self.unfinished else "not run"


@dataclass
class Layout:
    """Table layout: suite name, tasks in column order with their groups, method rows, seeds."""

    name: str
    description: str
    tasks: list[tuple[str, str]]
    methods: list[str]
    seeds: list[int]
    source: str = ""  # the suite/grid file the results were run from

    @property
    def bench_command(self) -> str:
        """The `thrifty bench` source flag that reproduces these results."""
        suites = os.path.basename(os.path.dirname(self.source)) == "suites"
        return f"--suite {self.name}" if suites or not self.source else f"--grid {self.source}"

    @property
    def groups(self) -> list[str]:
        return list(dict.fromkeys(g for _, g in self.tasks))

    def group_tasks(self, group: str) -> list[str]:
        return [t for t, g in self.tasks if g == group]


def _subdirs(path: str) -> list[str]:
    return sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)) and not d.startswith("."))


def read_layout(out_dir: str) -> Layout:
    """From DIR/suite.json (written by `thrifty bench`); methods and seeds found on disk are added to it."""
    manifest = read_json(os.path.join(out_dir, MANIFEST)) or {}
    if manifest.get("tasks"):
        tasks = [(t["name"], t.get("group", "all")) for t in manifest["tasks"]]
    else:
        tasks = [(t, "all") for t in _subdirs(out_dir) if t != "report"]
    found: list[str] = []
    seeds = set()
    for task, _ in tasks:
        tdir = os.path.join(out_dir, task)
        for label in _subdirs(tdir) if os.path.isdir(tdir) else []:
            found.append(label)
            seeds.update(int(s[4:]) for s in _subdirs(os.path.join(tdir, label)) if re.fullmatch(r"seed\d+", s))
    # suite order first, then rows run with --methods NAME that the suite does not list; rows never run are left out
    methods = [m for m in dict.fromkeys([*(manifest.get("methods") or []), *sorted(found)]) if m in found]
    return Layout(
        name=str(manifest.get("name") or os.path.basename(os.path.abspath(out_dir))),
        description=str(manifest.get("description") or ""),
        tasks=tasks,
        methods=methods,
        seeds=sorted(seeds),
        source=str(manifest.get("source") or ""),
    )


def collect(out_dir: str) -> tuple[Layout, list[CellResult]]:
    """Every expected cell (tasks x methods x seeds) with its state and results."""
    layout = read_layout(out_dir)
    cells = []
    for task, _ in layout.tasks:
        for label in layout.methods:
            for seed in layout.seeds:
                d = os.path.join(out_dir, task, label, f"seed{seed}")
                if not os.path.isdir(d):
                    cells.append(CellResult(task, label, seed, "missing"))
                    continue
                state = cell_state(d)
                res = read_json(os.path.join(d, RESULTS)) if state == "complete" else None
                fail = read_json(os.path.join(d, FAILED)) if state == "failed" else None
                run = (read_json(os.path.join(d, CELL_SPEC)) or {}).get("last_run") or {}
                cells.append(CellResult(task, label, seed, state, res, fail, run.get("loadavg_at_start"), run))
    return layout, cells


def metric_label(cells: list[CellResult]) -> str:
    """How tables and plots name the numbers: 'top-1 %' for accuracy, else the objectives' metric names."""
    names = sorted({c.metric for c in cells if c.ok}) or ["accuracy"]
    if names == ["accuracy"]:
        return "top-1 %"
    percent = all((c.results.get("objective") or {}).get("percent", True) for c in cells if c.ok)
    return " / ".join(names) + (" (%)" if percent else "")


def _task_cell(cells: list[CellResult]) -> TaskCell:
    scores = [c.score for c in cells if c.score is not None]
    return TaskCell(
        Stat.of(scores),
        seeds=[c.seed for c in cells if c.score is not None],
        failed=[c.seed for c in cells if c.state == "failed"],
        unfinished=[c.seed for c in cells if c.state == "partial"],
    )


def _mean(values: list[float | None]) -> float | None:
    return None if not values or any(v is None for v in values) else sum(values) / len(values)


def aggregate(layout: Layout, cells: list[CellResult]) -> dict[str, dict[str, Any]]:
    """Per method row: {'tasks': {task: TaskCell}, 'groups': {group: Stat}, MEAN_OF_GROUPS: Stat,
    MEAN_OF_TASKS: Stat, 'costs': {key: mean over tasks of the mean over complete seeds},
    'group_costs': {group: the same over the group's tasks}}."""
    by: dict[tuple[str, str], list[CellResult]] = {}
    for c in cells:
        by.setdefault((c.label, c.task), []).append(c)
    all_tasks = [t for t, _ in layout.tasks]
    rows = {}
    for label in layout.methods:
        tcells = {t: _task_cell(by.get((label, t), [])) for t in all_tasks}
        acc = {(c.task, c.seed): c.score for t in all_tasks for c in by.get((label, t), [])}

        def seed_value(seed: int, tasks: list[str] | None = None, acc=acc) -> float | None:
            """Aggregate of one seed: mean over `tasks`, or (None) the mean of the group means."""
            if tasks is not None:
                return _mean([acc.get((t, seed)) for t in tasks])
            return _mean([seed_value(seed, layout.group_tasks(g)) for g in layout.groups])

        def summary(value: float | None, tasks: list[str] | None = None) -> Stat:
            if value is None:
                return Stat(None)
            spread = [v for s in layout.seeds if (v := seed_value(s, tasks)) is not None]
            return Stat(value, Stat.of(spread).std, len(spread))

        task_means = {t: tcells[t].stat.mean for t in all_tasks}
        groups = {
            g: summary(_mean([task_means[t] for t in layout.group_tasks(g)]), layout.group_tasks(g))
            for g in layout.groups
        }
        mog = summary(_mean([groups[g].mean for g in layout.groups]))
        mot = summary(_mean([task_means[t] for t in all_tasks]), all_tasks)
        costs = {key: _mean_cost(by, label, all_tasks, key) for key in COSTS}
        group_costs = {g: {key: _mean_cost(by, label, layout.group_tasks(g), key) for key in COSTS} for g in groups}
        rows[label] = {
            "tasks": tcells,
            "groups": groups,
            MEAN_OF_GROUPS: mog,
            MEAN_OF_TASKS: mot,
            "costs": costs,
            "group_costs": group_costs,
        }
    return rows


def _mean_cost(by: dict[tuple[str, str], list[CellResult]], label: str, tasks: list[str], key: str) -> float | None:
    """Mean over `tasks` (those with a complete run) of the mean cost over their complete seeds."""
    per_task = [
        sum(vals) / len(vals)
        for t in tasks
        if (vals := [v for c in by.get((label, t), []) if (v := c.cost(key)) is not None])
    ]
    return sum(per_task) / len(per_task) if per_task else None
