"""Result tables (Markdown + CSV, timm `results/*.csv` style: one row per method) from a bench results folder.

Columns: every task in suite order (top-1 % on test, mean ± std over seeds), the group means, "mean of group
means", "mean of tasks", then costs averaged over tasks: trainable params, adapter bytes, bytes saved for
backward, peak memory, seconds per epoch, total training seconds. A task whose runs all failed reads "failed".
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import os
import re
from typing import Any

from thrifty.bench.collect import (
    COSTS,
    MEAN_OF_GROUPS,
    MEAN_OF_TASKS,
    CellResult,
    Layout,
    Stat,
    TaskCell,
    metric_label,
)


COST_TITLES = {
    "trainable_params": "trainable params",
    "adapter_params": "adapter params",
    "adapter_bytes": "adapter bytes",
    "saved_activation_bytes": "bytes saved for backward",
    "peak_memory_bytes": "peak memory",
    "seconds_per_epoch": "s / epoch",
    "train_seconds": "train s",
}
TABLE_COSTS = (
    "trainable_params",
    "adapter_bytes",
    "saved_activation_bytes",
    "peak_memory_bytes",
    "seconds_per_epoch",
    "train_seconds",
)


def human_count(n: float | None) -> str:
    if n is None:
        return "-"
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.0f}"


def human_bytes(n: float | None) -> str:
    """IEC units (KiB = 1024 B)."""
    if n is None:
        return "-"
    for div, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if abs(n) >= div:
            return f"{n / div:.3g} {unit}"
    return f"{n:.0f} B"


def fmt_cost(key: str, v: float | None) -> str:
    if v is None:
        return "-"
    if key.endswith("_bytes"):
        return human_bytes(v)
    if key.endswith("_params"):
        return human_count(v)
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def fmt_stat(s: Stat, digits: int) -> str:
    if s.mean is None:
        return "n/a"
    return f"{s.mean:.{digits}f}" + (f" ± {s.std:.{digits}f}" if s.std is not None else "")


def fmt_task(tc: TaskCell, n_seeds: int) -> str:
    if tc.status != "ok":
        return tc.status
    text = fmt_stat(tc.stat, 1)
    if tc.stat.n < n_seeds:
        text += f" ({tc.stat.n}/{n_seeds}" + (f", {len(tc.failed)} failed)" if tc.failed else ")")
    return text


def table_columns(layout: Layout) -> list[str]:
    return (
        ["method"]
        + [t for t, _ in layout.tasks]
        + [f"{g} mean" for g in layout.groups]
        + [MEAN_OF_GROUPS, MEAN_OF_TASKS]
        + [COST_TITLES[k] for k in TABLE_COSTS]
    )


def markdown_table(layout: Layout, rows: dict[str, dict[str, Any]]) -> str:
    cols = table_columns(layout)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] + ["---:"] * (len(cols) - 1)) + "|"]
    n = len(layout.seeds)
    for label, r in rows.items():
        cells = [label]
        cells += [fmt_task(r["tasks"][t], n) for t, _ in layout.tasks]
        cells += [fmt_stat(r["groups"][g], 2) for g in layout.groups]
        cells += [f"**{fmt_stat(r[MEAN_OF_GROUPS], 2)}**", f"**{fmt_stat(r[MEAN_OF_TASKS], 2)}**"]
        cells += [fmt_cost(k, r["costs"][k]) for k in TABLE_COSTS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def csv_table(layout: Layout, rows: dict[str, dict[str, Any]]) -> str:
    """Machine-readable: numbers unformatted; `<col>` mean, `<col>_std`, `<col>_n`; "failed" for failed tasks."""
    header = ["method"]
    names = [t for t, _ in layout.tasks] + [f"{g} mean" for g in layout.groups] + [MEAN_OF_GROUPS, MEAN_OF_TASKS]
    for name in names:
        header += [name, f"{name}_std", f"{name}_n"]
    header += list(COSTS)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for label, r in rows.items():
        out: list[Any] = [label]
        for t, _ in layout.tasks:
            tc = r["tasks"][t]
            out += [_num(tc.stat.mean) if tc.status == "ok" else tc.status, _num(tc.stat.std), tc.stat.n]
        for s in [r["groups"][g] for g in layout.groups] + [r[MEAN_OF_GROUPS], r[MEAN_OF_TASKS]]:
            out += [_num(s.mean), _num(s.std), s.n]
        out += [_num(r["costs"][k]) for k in COSTS]
        w.writerow(out)
    return buf.getvalue()


def _num(v: float | None) -> str:
    return "" if v is None else f"{v:.6g}"


def cells_csv(cells: list[CellResult]) -> str:
    """Long format: one line per (task, method, seed) with its state, accuracy and costs."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["task", "method", "seed", "state", "test_score", *COSTS, "returncode"])
    for c in cells:
        w.writerow(
            [
                c.task,
                c.label,
                c.seed,
                c.state,
                _num(c.score),
                *[_num(c.cost(k)) for k in COSTS],
                (c.failure or {}).get("returncode", ""),
            ]
        )
    return buf.getvalue()


def _uniq(values) -> list[Any]:
    out = []
    for v in values:
        if v is not None and v not in out:
            out.append(v)
    return out


def machine(env: dict[str, Any]) -> str:
    dev = env.get("gpu") or env.get("device", "?")
    cpu = env.get("cpu_model") or env.get("processor") or "unknown CPU"
    return (
        f"device {dev}; {cpu}, {env.get('cpu_count')} logical cores, {env.get('torch_threads')} torch threads; "
        f"{env.get('platform')}"
    )


def provenance(cells: list[CellResult]) -> dict[str, Any]:
    """Machines, versions, dates, selection rules and recipes recorded in the results."""
    done = [c for c in cells if c.ok]
    envs = [c.results.get("env") or {} for c in done]
    trains = [(c, c.results.get("train") or {}) for c in done]
    created = sorted(c.results.get("created", "") for c in done if c.results.get("created"))
    versions = _uniq(", ".join(f"{k} {v}" for k, v in sorted((e.get("versions") or {}).items()) if v) for e in envs)
    shas = _uniq(e.get("git_sha") for e in envs if e.get("git_sha"))
    if shas:  # one list of commits instead of one version line per commit
        versions = [f"{v}; git {', '.join(shas)}" for v in versions]
    selection = _uniq(
        "best val200 epoch (trained on train800; test used once)"
        if t.get("select_on_val")
        else "final epoch (trained on train800val200; test used once, never for selection)"
        for _, t in trains
    )
    recipes: dict[str, list[str]] = {}
    for c, t in trains:
        text = (
            f"epochs {t.get('epochs')}, batch {t.get('batch_size')}, lr {t.get('lr')}, wd {t.get('weight_decay')}, "
            f"warm-up epochs {t.get('warmup_epochs')}, min lr {t.get('min_lr')}, grad clip {t.get('grad_clip')}"
        )
        recipes.setdefault(c.label, [])
        if text not in recipes[c.label]:
            recipes[c.label].append(text)
    loads = [c.load for c in done if c.load is not None]
    cores = max((e.get("cpu_count") or 0 for e in envs), default=0)
    return {
        "load": (min(loads), max(loads), cores) if loads else None,
        "machines": _uniq(machine(e) for e in envs),
        "versions": versions,
        "dates": (created[0][:10], created[-1][:10]) if created else None,
        "selection": selection,
        "recipes": recipes,
        "peak_kinds": _uniq((c.results.get("metrics") or {}).get("peak_memory_kind") for c in done),
        "batch": _uniq((c.results.get("metrics") or {}).get("measured_batch_size") for c in done),
    }


def caption(layout: Layout, cells: list[CellResult], prov: dict[str, Any]) -> str:
    groups = ", ".join(f"{g} ({len(layout.group_tasks(g))})" for g in layout.groups)
    seeds = ", ".join(map(str, layout.seeds))
    n_failed = sum(c.state == "failed" for c in cells)
    lines = [
        f"Suite **{layout.name}**: {len(layout.tasks)} tasks in {len(layout.groups)} groups: {groups}.",
        f"Numbers: {metric_label(cells)} on each task's test split (the objective's headline metric; top-1 % is "
        "accuracy). Model selection: " + "; ".join(prov["selection"] or ["-"]) + ".",
        f"Seeds: {seeds}; each entry is the mean ± sample standard deviation (ddof 1) over seeds; "
        "(k/n) marks a task with only k of n seeds complete.",
        f"**{MEAN_OF_GROUPS}** = mean of the group means (VPT/NOAH/FacT convention); **{MEAN_OF_TASKS}** = plain "
        f"mean over the {len(layout.tasks)} tasks (V-PETL's 'Mean'). Their ± is the spread of the per-seed mean; "
        "n/a when a task has no complete run.",
        "Costs are means over tasks (of the mean over seeds): trainable params include the head; adapter bytes = "
        "adapter_model.safetensors; bytes saved for backward by autograd in one training step at batch "
        + "/".join(map(str, prov["batch"] or ["?"]))
        + "; peak memory = "
        + "/".join(prov["peak_kinds"] or ["not measured (--no-peak-memory)"])
        + " (measured for the first seed of each method and task)"
        + "; s / epoch and train s = wall-clock training time per epoch and in total.",
        f"Failed runs: {n_failed} (shown as 'failed'; details in <task>/<method>/seed<k>/failed.json)."
        if n_failed
        else "Failed runs: none.",
        "Machine: " + " | ".join(prov["machines"] or ["-"]) + ".",
        "Versions: " + " | ".join(prov["versions"] or ["-"]) + ".",
    ]
    if prov["load"]:
        lo, hi, cores = prov["load"]
        busy = " (busier than its cores: the timings are inflated)" if hi > cores else ""
        lines.append(f"1-minute load average when the cells started: {lo:.1f} to {hi:.1f} on {cores} cores{busy}.")
    if prov["dates"]:
        lines.append(
            f"Runs dated {prov['dates'][0]}"
            + (f" to {prov['dates'][1]}." if prov["dates"][1] != prov["dates"][0] else ".")
        )
    return "\n".join(f"- {x}" for x in lines)


def recipes_table(prov: dict[str, Any]) -> str:
    lines = ["| method | recipe (as recorded in results.json) |", "|---|---|"]
    lines += [f"| {m} | {'; '.join(r)} |" for m, r in prov["recipes"].items()]
    return "\n".join(lines)


def env_tag(prov_cells: list[CellResult]) -> str:
    """`cpu2-pt2.14.1` / `nvidia-h100-80gb-hbm3-pt2.14.1`: encodes the machine in file names (timm style)."""
    envs = [c.results.get("env") or {} for c in prov_cells if c.ok]
    if not envs:
        return "noresults"
    e = envs[0]
    dev = e.get("gpu") or f"cpu{e.get('cpu_count', '')}"
    torch_v = (e.get("versions") or {}).get("torch") or "x"
    return re.sub(r"[^a-z0-9.]+", "-", f"{dev}-pt{torch_v}".lower()).strip("-")


def env_words(env: dict[str, Any]) -> str:
    """The machine in words for plot titles: 'CPU (AMD EPYC, 2 cores), torch 2.14.1' or
    'GPU (NVIDIA H100 80GB HBM3), torch 2.14.1'."""
    if env.get("gpu"):
        dev = f"GPU ({env['gpu']})"
    else:
        what = [x for x in (env.get("cpu_model"), f"{env['cpu_count']} cores" if env.get("cpu_count") else None) if x]
        dev = str(env.get("device") or "cpu").upper() + (f" ({', '.join(what)})" if what else "")
    torch_v = (env.get("versions") or {}).get("torch")
    return dev + (f", torch {torch_v}" if torch_v else "")


def describe_env(cells: list[CellResult]) -> str:
    """`env_words` of the machines the complete cells ran on ('' when none); more than two: their count."""
    machines = _uniq(env_words(c.results.get("env") or {}) for c in cells if c.ok and c.results.get("env"))
    if len(machines) > 2:
        return f"{len(machines)} machines (see the report's Machine line)"
    return " + ".join(machines)


def load_note(prov: dict[str, Any]) -> str:
    """'' or a warning for timing plots when the cells ran with more load than cores."""
    if not prov.get("load"):
        return ""
    lo, hi, cores = prov["load"]
    if hi <= cores:
        return ""
    return f"shared machine: load {lo:.1f} to {hi:.1f} on {cores} cores when cells started, times inflated"


def today() -> str:
    return _dt.date.today().isoformat()


def write(path: str, text: str) -> str:
    from thrifty.io import write_text

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_text(path, text)
    return path
