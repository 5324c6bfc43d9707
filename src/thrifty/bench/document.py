"""`build_report(DIR)`: tables, CSVs and plots into DIR/report/, and optionally a docs page (docs/benchmarks.md)
with the plots copied beside it."""

from __future__ import annotations

import os
import shutil
from typing import Any

from thrifty.bench.collect import CellResult, aggregate, collect, metric_label
from thrifty.bench.plots import PLOTS, group_slug, plot_per_class, plot_tradeoffs, remove_stale_plots
from thrifty.bench.report import (
    caption,
    cells_csv,
    csv_table,
    describe_env,
    env_tag,
    fmt_cost,
    load_note,
    markdown_table,
    provenance,
    recipes_table,
    today,
    write,
)


MORE_DOCS = "benchmarks-more.md"  # hand-written benchmarks beside the generated page, linked when present


def cost_rows(cells: list[CellResult]) -> str:
    """Per (task, method) costs, averaged over complete seeds."""
    keys = ("trainable_params", "adapter_bytes", "saved_activation_bytes", "peak_memory_bytes", "seconds_per_epoch")
    lines = [
        "| task | method | seeds | " + " | ".join(k.replace("_", " ") for k in keys) + " |",
        "|---|---|---:|" + "---:|" * len(keys),
    ]
    groups: dict[tuple[str, str], list[CellResult]] = {}
    for c in cells:
        groups.setdefault((c.task, c.label), []).append(c)
    for (task, label), cs in groups.items():
        ok = [c for c in cs if c.ok]
        vals = []
        for k in keys:
            v = [x for c in ok if (x := c.cost(k)) is not None]
            vals.append(fmt_cost(k, sum(v) / len(v) if v else None))
        lines.append(f"| {task} | {label} | {len(ok)}/{len(cs)} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def grid_cost(cells: list[CellResult]) -> str:
    """Wall-clock and CPU time of the grid per method row (sum over its complete cells, last attempt each)."""
    lines = [
        "| method | cells | wall-clock (min) | CPU (min) | mean load at start |",
        "|---|---:|---:|---:|---:|",
    ]
    by: dict[str, list[CellResult]] = {}
    for c in cells:
        if c.ok and c.run.get("wall_seconds") is not None:
            by.setdefault(c.label, []).append(c)
    total = [0, 0.0, 0.0]
    for label, cs in by.items():
        wall = sum(c.run["wall_seconds"] for c in cs)
        cpu = sum(c.run.get("cpu_seconds") or 0.0 for c in cs)
        loads = [c.load for c in cs if c.load is not None]
        load = f"{sum(loads) / len(loads):.1f}" if loads else "n/a"
        lines.append(f"| {label} | {len(cs)} | {wall / 60:.1f} | {cpu / 60:.1f} | {load} |")
        total = [total[0] + len(cs), total[1] + wall, total[2] + cpu]
    lines.append(f"| **all** | {total[0]} | {total[1] / 60:.1f} | {total[2] / 60:.1f} | |")
    return "\n".join(lines)


def failures(cells: list[CellResult]) -> str:
    out = []
    for c in cells:
        if c.state == "failed":
            f = c.failure or {}
            tail = (f.get("stderr_tail") or "").strip().splitlines()
            last = tail[-1] if tail else "no stderr"
            out.append(f"- `{c.task}/{c.label}/seed{c.seed}`: exit code {f.get('returncode')}: `{last}`")
    return "\n".join(out)


def tradeoff_text(plots: list[str], groups: list[str]) -> str:
    """What the plots below show, and which are left out and why (a plot without points is not written)."""
    overall_names = {fname for fname, *_ in PLOTS.values()}
    overall = [p for p in plots if os.path.basename(p) in overall_names]
    if not plots:
        return "No trade-off plots: no method has a complete run with its costs recorded yet (see the table above)."
    point = (
        "Each point is one method, labelled with its name; red points joined by the step line form the Pareto front "
        "(no other method is both cheaper and better). A cost axis is logarithmic where the costs span a decade or "
        "more and linear where they do not."
    )
    if not overall:
        names = {os.path.basename(p) for p in plots}
        empty = [g for g in groups if not any(n.endswith(f"-{group_slug(g)}.png") for n in names)]
        return (
            f"{point} No method finished every group, so there is no mean of group means and the overall plots are "
            "left out; the per-group plots (`...-<group>.png`) place each method by that group's mean (± std over "
            "seeds) and its costs over that group's tasks."
            + (f" No plot for {', '.join(empty)}: no method finished every task of it." if empty else "")
        )
    text = f"{point} y = mean of group means (± std over seeds), x = a cost averaged over tasks."
    if len(plots) > len(overall):
        text += (
            "\n\nMethods that finished only some groups have no mean of group means, so they are missing from the "
            "first plots; the per-group plots (`...-<group>.png`) place every method by that group's mean and its "
            "costs over that group's tasks."
        )
    missing = len(PLOTS) - len(overall)
    if missing:
        text += f" {missing} overall plot(s) left out: no method with a mean of group means recorded that cost."
    return text


def per_class_plots(layout, cells: list[CellResult], out_dir: str) -> list[str]:
    """One bar plot per task whose runs report `test_per_class_accuracy` (the long_tail objective): each method's
    per-class accuracy, mean over its complete seeds, classes ordered by training count."""
    written = []
    for task, _ in layout.tasks:
        series, counts = {}, None
        for label in layout.methods:
            runs = [c.results for c in cells if c.ok and c.task == task and c.label == label]
            accs = [
                r["metrics"]["test_per_class_accuracy"] for r in runs if r["metrics"].get("test_per_class_accuracy")
            ]
            if not accs:
                continue
            series[label] = [
                None if any(a[i] is None for a in accs) else sum(a[i] for a in accs) / len(accs)
                for i in range(len(accs[0]))
            ]
            counts = counts or ((runs[0].get("objective") or {}).get("train_counts"))
        if series:
            name = "per_class-" + "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in task) + ".png"
            written.append(plot_per_class(series, counts, os.path.join(out_dir, name), f"{task}: per-class accuracy"))
    return written


def render(
    layout, rows, cells, prov, plots: list[str], md_dir: str, heading: str, note: str = "", per_class=()
) -> str:
    rel = [os.path.relpath(p, md_dir) for p in plots]
    parts = [f"# {heading}", ""]
    if note:
        parts += [note, ""]
    if layout.description:
        parts += [layout.description, ""]
    parts += ["## Results", "", caption(layout, cells, prov), "", markdown_table(layout, rows), ""]
    fails = failures(cells)
    if fails:
        parts += ["### Failed runs", "", fails, ""]
    parts += ["## Trade-offs", "", tradeoff_text(plots, layout.groups), ""]
    parts += [f"![{os.path.splitext(os.path.basename(r))[0]}]({r})" for r in rel] + [""]
    if per_class:
        parts += ["## Per-class accuracy", "", "Mean over seeds; classes from head to tail (training count).", ""]
        parts += [f"![{os.path.basename(p)}]({os.path.relpath(p, md_dir)})" for p in per_class] + [""]
    parts += ["## Recipes", "", recipes_table(prov), "", "## Costs per task", "", cost_rows(cells), ""]
    parts += [
        "## Cost of the grid",
        "",
        "Each cell's wall-clock and CPU seconds as `thrifty bench` recorded them (its last attempt; a cell resumed "
        "after an interruption counts only the resumed part), with the machine's 1-minute load average when the "
        "cell started (2 cores: a load above 2 means the cell shared the CPU and its wall-clock is inflated).",
        "",
        grid_cost(cells),
        "",
    ]
    return "\n".join(parts)


def build_report(out_dir: str, report_dir: str | None = None, docs: str | None = None) -> dict[str, Any]:
    """Write the report files; returns {'markdown', 'csv', 'cells_csv', 'plots', 'docs', 'rows'}."""
    layout, cells = collect(out_dir)
    rows = aggregate(layout, cells)
    prov = provenance(cells)
    report_dir = report_dir or os.path.join(out_dir, "report")
    stem = f"{layout.name}-{env_tag(cells)}"
    plots = plot_tradeoffs(
        rows, report_dir, layout.name, metric_label(cells), describe_env(cells), {"train_seconds": load_note(prov)}
    )
    per_class = per_class_plots(layout, cells, report_dir)
    md = render(layout, rows, cells, prov, plots, report_dir, f"Benchmark: {layout.name}", per_class=per_class)
    out = {
        "markdown": write(os.path.join(report_dir, f"{stem}.md"), md),
        "csv": write(os.path.join(report_dir, f"{stem}.csv"), csv_table(layout, rows)),
        "cells_csv": write(os.path.join(report_dir, f"{stem}-cells.csv"), cells_csv(cells)),
        "plots": plots,
        "per_class_plots": per_class,
        "rows": rows,
        "table": markdown_table(layout, rows),
        "docs": None,
    }
    if docs:
        docs_dir = os.path.dirname(os.path.abspath(docs))
        image_dir = os.path.join(docs_dir, os.path.splitext(os.path.basename(docs))[0])
        os.makedirs(image_dir, exist_ok=True)
        copied = []
        for p in plots + per_class:
            dst = os.path.join(image_dir, os.path.basename(p))
            shutil.copyfile(p, dst)
            copied.append(dst)
        remove_stale_plots(image_dir, copied)  # never leave a plot the page does not link
        shutil.copyfile(out["csv"], os.path.join(image_dir, os.path.basename(out["csv"])))
        note = (
            f"Generated on {today()} by `thrifty report {out_dir} --docs {docs}` from the results of "
            f"`thrifty bench {layout.bench_command} --output {out_dir}`; do not edit by hand: rerun both commands. "
            f"Machine-readable table: [{os.path.basename(out['csv'])}]"
            f"({os.path.relpath(os.path.join(image_dir, os.path.basename(out['csv'])), docs_dir)})."
        )
        if os.path.exists(os.path.join(docs_dir, MORE_DOCS)):
            note += f" Benchmarks outside this grid, each with its own script and JSON: [{MORE_DOCS}]({MORE_DOCS})."
        n = len(plots)
        text = render(layout, rows, cells, prov, copied[:n], docs_dir, "Benchmarks", note, per_class=copied[n:])
        out["docs"] = write(docs, text)
    return out
