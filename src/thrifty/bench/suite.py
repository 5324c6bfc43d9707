"""Suites and grids: one YAML schema that expands to a list of `thrifty train` cells (task x method x seed).

    name: offline                      # suite name (recorded with the results)
    description: ...                   # free text, copied into the report
    seeds: [0, 1, 2]
    defaults: {epochs: 10, ...}        # `thrifty train` flags for every cell (snake or kebab case) + `set:`
    tasks:                             # in table-column order
      - name: reviews                  # folder name of the cell: DIR/<task>/<method>/seed<k>/
        group: text                    # group mean over the tasks of a group
        data: reviews:1k               # any `thrifty train` flag: data, backbone, max_length, test_size, set, ...
    methods:                           # table-row order; key = row label
      linear: {}
      full: {lr: 1.0e-4}               # flags for this method on every task
      lora-r4: {method: lora, set: {r: 4}}          # a variant of a registered method
      dtl: {tasks: {cifar: {lr: 3.0e-4}}}           # per-task flags for one method
      last: {only_tasks: [reviews]}                 # run this row on these tasks only

Layers override in this order: defaults < task < method < method.tasks[task]; `set:` mappings merge the same
way and become `--set key=value` (lists are joined with commas). String values may use `{data_root}` (required
from `--data-root` when used) and `{checkpoint}` (a value that is exactly "{checkpoint}" is dropped when
`--checkpoint` is not given, so the backbone loads its default pretrained weights).
The harness owns `method`, `seed`, `output`, `resume`, `overwrite` and `config`; a suite cannot set them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from thrifty.errors import ConfigError
from thrifty.io import load_config_file
from thrifty.train.options import Option, options_to_argv, train_options


RESERVED = frozenset({"method", "seed", "output", "resume", "overwrite", "config", "set", "command"})
METHOD_KEYS = frozenset({"tasks", "method", "only_tasks"})
SUITE_KEYS = frozenset({"name", "description", "seeds", "defaults", "tasks", "methods"})
TASK_KEYS = frozenset({"name", "group"})


@dataclass
class Task:
    name: str
    group: str
    options: dict[str, Any]


@dataclass
class Suite:
    """A parsed suite or grid file. `methods` maps row label -> (registered method, options, per-task options)."""

    name: str
    description: str
    seeds: list[int]
    defaults: dict[str, Any]
    tasks: list[Task]
    methods: dict[str, dict[str, Any]]
    source: str = ""

    @property
    def groups(self) -> list[str]:
        """Groups in order of first appearance."""
        return list(dict.fromkeys(t.group for t in self.tasks))

    def manifest(self) -> dict[str, Any]:
        """What the report needs to lay out the table (task order, groups, method order), saved with results."""
        return {
            "name": self.name,
            "description": self.description,
            "source": self.source,
            "seeds": list(self.seeds),
            "tasks": [{"name": t.name, "group": t.group} for t in self.tasks],
            "methods": list(self.methods),
        }


@dataclass
class Cell:
    """One `thrifty train` run: `flags` are its resolved train flags (without the harness-owned ones)."""

    task: str
    group: str
    label: str  # table row (suite method key)
    method: str  # registered method name
    seed: int
    flags: dict[str, Any]
    sets: dict[str, str] = field(default_factory=dict)

    def rel_dir(self) -> str:
        return os.path.join(self.task, self.label, f"seed{self.seed}")

    def argv(self, output: str) -> list[str]:
        """`thrifty train` arguments of this cell writing into `output`."""
        return [
            "--method",
            self.method,
            "--seed",
            str(self.seed),
            "--output",
            output,
            *options_to_argv(self.flags),
        ] + [x for k, v in sorted(self.sets.items()) for x in ("--set", f"{k}={v}")]

    def spec(self) -> dict[str, Any]:
        """The identity of the cell (what must match for an existing result to count as this cell's)."""
        return {"method": self.method, "seed": self.seed, "flags": self.flags, "set": self.sets}


def _layer(
    raw: Any, where: str, actions: dict[str, Option], skip: frozenset[str] = frozenset()
) -> tuple[dict[str, Any], dict[str, str]]:
    """Split one mapping into (train flags, set options), checking every key against `thrifty train`;
    keys in `skip` belong to the caller (a task's `name`, a method's `method` and `tasks`)."""
    if raw is None:
        return {}, {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping of `thrifty train` options, got {type(raw).__name__}")
    flags, sets = {}, {}
    for key, value in raw.items():
        dest = str(key).replace("-", "_")
        if dest == "set":
            if not isinstance(value, dict):
                raise ConfigError(f"{where}.set must map method options to values")
            sets = {str(k).replace("-", "_"): _set_value(v) for k, v in value.items()}
        elif dest in skip:
            continue
        elif dest in RESERVED:
            raise ConfigError(f"{where}: `{key}` is set by `thrifty bench` for each cell; remove it")
        elif dest not in actions:
            raise ConfigError(f"{where}: unknown option `{key}`; use `thrifty train` flags ({', '.join(actions)})")
        else:
            flags[dest] = value
    return flags, sets


def _set_value(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(str(x) for x in v)
    if isinstance(v, bool):
        return str(v).lower()
    return "none" if v is None else str(v)


def parse_suite(data: dict[str, Any], source: str = "") -> Suite:
    """Validate a suite/grid mapping (module docstring) into a `Suite`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source or 'suite'} must be a mapping with `tasks` and `methods`")
    unknown = set(data) - SUITE_KEYS
    if unknown:
        raise ConfigError(f"{source}: unknown top-level keys {sorted(unknown)}; allowed: {sorted(SUITE_KEYS)}")
    actions = train_options()
    _layer(data.get("defaults"), "defaults", actions)  # validate early
    tasks_raw = data.get("tasks") or []
    if not isinstance(tasks_raw, list) or not tasks_raw:
        raise ConfigError(f"{source}: `tasks` must be a non-empty list of {{name, group, data, ...}} mappings")
    tasks, seen = [], set()
    for i, t in enumerate(tasks_raw):
        if not isinstance(t, dict) or "name" not in t:
            raise ConfigError(f"{source}: tasks[{i}] needs a `name`")
        name = str(t["name"])
        if name in seen or "/" in name or name.startswith("."):
            raise ConfigError(f"{source}: task name {name!r} is duplicated or not a plain folder name")
        seen.add(name)
        _layer(t, f"tasks[{name}]", actions, TASK_KEYS)
        tasks.append(Task(name, str(t.get("group", "all")), {k: v for k, v in t.items() if k not in TASK_KEYS}))
    methods_raw = data.get("methods") or {}
    if isinstance(methods_raw, list):
        methods_raw = {str(m): {} for m in methods_raw}
    if not isinstance(methods_raw, dict) or not methods_raw:
        raise ConfigError(f"{source}: `methods` must map row labels to option mappings (e.g. `lora: {{r: 8}}`)")
    methods = {}
    for label, m in methods_raw.items():
        m = dict(m or {})
        _layer(m, f"methods[{label}]", actions, METHOD_KEYS)
        for tname in m.get("only_tasks") or []:
            if tname not in seen:
                raise ConfigError(f"{source}: methods[{label}].only_tasks names unknown task {tname!r}")
        per_task = m.get("tasks") or {}
        for tname, opts in per_task.items():
            if tname not in seen:
                raise ConfigError(f"{source}: methods[{label}].tasks names unknown task {tname!r}")
            _layer(opts, f"methods[{label}].tasks[{tname}]", actions)
        methods[str(label)] = m
    seeds = data.get("seeds", [0])
    seeds = [seeds] if isinstance(seeds, int) else seeds
    if not isinstance(seeds, list) or not all(isinstance(s, int) for s in seeds) or not seeds:
        raise ConfigError(f"{source}: `seeds` must be a list of integers")
    return Suite(
        name=str(data.get("name") or os.path.splitext(os.path.basename(source))[0] or "grid"),
        description=str(data.get("description") or "").strip(),
        seeds=seeds,
        defaults=dict(data.get("defaults") or {}),
        tasks=tasks,
        methods=methods,
        source=source,
    )


def suite_dirs() -> list[str]:
    """Where `--suite NAME` looks: ./benchmarks/suites, then the source checkout's benchmarks/suites."""
    here = os.path.dirname(os.path.abspath(__file__))
    repo = os.path.abspath(os.path.join(here, "..", "..", ".."))
    return list(
        dict.fromkeys([os.path.join(os.getcwd(), "benchmarks", "suites"), os.path.join(repo, "benchmarks", "suites")])
    )


def find_suite(name: str) -> str:
    """Path of suite `name` (a file path, or a name under benchmarks/suites/)."""
    if os.path.isfile(name):
        return name
    for d in suite_dirs():
        for ext in (".yaml", ".yml"):
            path = os.path.join(d, name + ext)
            if os.path.isfile(path):
                return path
    known = sorted({f.rsplit(".", 1)[0] for d in suite_dirs() if os.path.isdir(d) for f in os.listdir(d)})
    raise ConfigError(f"unknown suite {name!r}; known: {', '.join(known) or 'none found'} (or pass --grid FILE)")


def load_suite(path: str) -> Suite:
    """Read a suite/grid YAML (or JSON) file."""
    return parse_suite(load_config_file(path), source=path)


def _fill(value: Any, variables: dict[str, str | None], where: str, used: set[str]) -> Any:
    if not isinstance(value, str) or "{" not in value:
        return value
    for name, val in variables.items():
        token = "{" + name + "}"
        if token in value:
            if val is None:
                raise ConfigError(f"{where} uses {token}; pass --{name.replace('_', '-')} to `thrifty bench`")
            value = value.replace(token, val)
            used.add(name)
    return value


def _merge(layers: list[tuple[dict[str, Any], dict[str, str]]]) -> tuple[dict[str, Any], dict[str, str]]:
    flags: dict[str, Any] = {}
    sets: dict[str, str] = {}
    for f, s in layers:
        flags.update(f)
        sets.update(s)
    return flags, sets


def expand(
    suite: Suite,
    *,
    methods: list[str] | None = None,
    tasks: list[str] | None = None,
    seeds: list[int] | None = None,
    data_root: str | None = None,
    checkpoint: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> list[Cell]:
    """All cells of `suite` (optionally a subset), task-major: for each task, for each method, for each seed.

    `methods` may name any registered method, also ones the suite does not list (they get the defaults).
    `overrides` are train flags applied last to every cell (e.g. {'epochs': 1} for a quick check).
    """
    actions = train_options()
    labels = methods or list(suite.methods)
    task_names = [t.name for t in suite.tasks]
    for t in tasks or []:
        if t not in task_names:
            raise ConfigError(f"unknown task {t!r} for suite {suite.name}; tasks: {', '.join(task_names)}")
    chosen = [t for t in suite.tasks if not tasks or t.name in tasks]
    over = _layer(overrides or {}, "--override", actions)
    variables = {"data_root": data_root, "checkpoint": checkpoint}
    cells: list[Cell] = []
    used: set[str] = set()
    for task in chosen:
        for label in labels:
            m = suite.methods.get(label, {})
            if m.get("only_tasks") and task.name not in m["only_tasks"]:
                continue
            layers = [
                _layer(suite.defaults, "defaults", actions),
                _layer(task.options, f"tasks[{task.name}]", actions),
                _layer(m, f"methods[{label}]", actions, METHOD_KEYS),
                _layer((m.get("tasks") or {}).get(task.name), f"methods[{label}].tasks[{task.name}]", actions),
                over,
            ]
            flags, sets = _merge(layers)
            if flags.get("checkpoint") == "{checkpoint}" and checkpoint is None:
                flags.pop("checkpoint")
            where = f"{suite.name}: {task.name}/{label}"
            flags = {k: _fill(v, variables, where, used) for k, v in flags.items()}
            sets = {k: _fill(v, variables, where, used) for k, v in sets.items()}
            for required in ("backbone", "data"):
                if not flags.get(required):
                    raise ConfigError(f"{where}: no `{required}` (set it in defaults or in the task)")
            method = str(m.get("method", label))
            for seed in seeds or suite.seeds:
                cells.append(Cell(task.name, task.group, label, method, int(seed), dict(flags), dict(sets)))
    for name, val in variables.items():
        if val is not None and name not in used:  # a flag that silently does nothing would mislabel the results
            raise ConfigError(f"suite {suite.name} does not use {{{name}}}; drop --{name.replace('_', '-')}")
    return cells
