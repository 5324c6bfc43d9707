"""Accuracy-vs-cost plots with the Pareto front marked (matplotlib, Agg backend: no display needed).

A plot is written only when it has points: a cost no method finished gets no PNG (and so no link in the report).
Axes follow `figures.configure_axis` (log only where the costs span a decade), every point is labelled
(`figures.label_points`), and titles name the suite, what is plotted and the machine in words."""

from __future__ import annotations

import glob
import os
import re
from typing import Any

from thrifty.bench.collect import MEAN_OF_GROUPS
from thrifty.bench.figures import configure_axis, fit_ticks, label_points, pyplot, save, wrap


PLOTS = {  # cost key -> (file name, x-axis label, unit kind, name in titles)
    "saved_activation_bytes": (
        "accuracy_vs_saved_bytes.png",
        "bytes saved for backward (one training step)",
        "bytes",
        "bytes saved for backward",
    ),
    "adapter_bytes": (
        "accuracy_vs_adapter_bytes.png",
        "adapter file bytes (adapter_model.safetensors)",
        "bytes",
        "adapter file size",
    ),
    "train_seconds": ("accuracy_vs_train_time.png", "training time (all epochs)", "seconds", "training time"),
}


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: lower-or-equal cost and higher-or-equal accuracy, one strictly.
    Returned in increasing cost."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


def plot_tradeoffs(
    rows: dict[str, dict[str, Any]],
    out_dir: str,
    suite: str,
    metric: str = "top-1 %",
    env: str = "",
    notes: dict[str, str] | None = None,
) -> list[str]:
    """One PNG per cost in PLOTS that has points: x = mean cost over tasks, y = mean of group means (± std over
    seeds). `env` (the machine in words) and `notes[cost]` go under the title. Returns the paths written; PNGs of
    these names left from an earlier report that were not rewritten are removed, so a folder never holds a plot
    the report does not link.

    A method with a group mean but no overall mean (it finished one group only, e.g. the text tasks) cannot be
    placed on the overall plots; then each group also gets one PNG per cost, `<plot>-<group>.png`: y = that group's
    mean, x = the cost over that group's tasks, so every method that finished a group appears on some plot. When no
    method has an overall mean the overall plots are not written at all (they would be empty)."""
    os.makedirs(out_dir, exist_ok=True)
    notes = notes or {}
    written = []
    for key, (fname, xlabel, kind, what) in PLOTS.items():
        pts = [
            (label, r["costs"][key], r[MEAN_OF_GROUPS])
            for label, r in rows.items()
            if r["costs"].get(key) is not None and r[MEAN_OF_GROUPS].mean is not None
        ]
        if pts:
            path = os.path.join(out_dir, fname)
            sub = _subtitle(env, notes.get(key), len(pts))
            ylabel = f"{metric} ({MEAN_OF_GROUPS})"
            written.append(
                _plot(pts, path, kind, xlabel + ", mean over tasks", ylabel, f"{suite}: {metric} vs {what}", sub)
            )
    groups = list(dict.fromkeys(g for r in rows.values() for g in r["groups"]))
    partial = any(
        r[MEAN_OF_GROUPS].mean is None and any(st.mean is not None for st in r["groups"].values())
        for r in rows.values()
    )
    if partial and len(groups) >= 2:
        for group in groups:
            for key, (fname, xlabel, kind, what) in PLOTS.items():
                pts = [
                    (label, r["group_costs"][group][key], r["groups"][group])
                    for label, r in rows.items()
                    if r["group_costs"][group].get(key) is not None and r["groups"][group].mean is not None
                ]
                if pts:
                    stem, ext = os.path.splitext(fname)
                    path = os.path.join(out_dir, f"{stem}-{group_slug(group)}{ext}")
                    ylabel = f"{metric} ({group} mean)"
                    title = f"{suite}, group {group}: {metric} vs {what}"
                    sub = _subtitle(env, notes.get(key), len(pts))
                    written.append(_plot(pts, path, kind, f"{xlabel}, mean over {group} tasks", ylabel, title, sub))
    remove_stale_plots(out_dir, written)
    return written


def group_slug(group: str) -> str:
    """The group's part of a per-group plot's file name."""
    return re.sub(r"[^A-Za-z0-9_.]+", "_", group)


def plot_files(out_dir: str) -> list[str]:
    """PNGs in `out_dir` named like the trade-off plots (`<plot>.png`, `<plot>-<group>.png`)."""
    found = []
    for fname, *_ in PLOTS.values():
        stem, ext = os.path.splitext(fname)
        found += glob.glob(os.path.join(glob.escape(out_dir), fname))
        found += glob.glob(os.path.join(glob.escape(out_dir), f"{stem}-*{ext}"))
    return sorted(found)


def remove_stale_plots(out_dir: str, keep: list[str]) -> list[str]:
    """Remove trade-off PNGs in `out_dir` not in `keep` (left by an earlier report); returns the removed paths."""
    keep_abs = {os.path.abspath(p) for p in keep}
    stale = [p for p in plot_files(out_dir) if os.path.abspath(p) not in keep_abs]
    for p in stale:
        os.remove(p)
    return stale


def _subtitle(env: str, note: str | None, n: int) -> str:
    parts = [f"{n} method{'s' if n != 1 else ''}"] + ([env] if env else []) + ([note] if note else [])
    return "; ".join(parts)


def _plot(
    pts: list[tuple[str, float, Any]], path: str, kind: str, xlabel: str, ylabel: str, title: str, sub: str
) -> str:
    """Points (label, cost, Stat of the metric) with the Pareto front marked; x axis scaled to the costs' range
    (`configure_axis`), every point labelled; returns `path`."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.6), dpi=120)
    xs = [p[1] for p in pts]
    ys = [p[2].mean for p in pts]
    lows = [p[2].mean - (p[2].std or 0.0) for p in pts]
    highs = [p[2].mean + (p[2].std or 0.0) for p in pts]
    configure_axis(ax, "x", xs, kind)
    configure_axis(ax, "y", lows + highs, pad=0.12, scale="linear")  # the metric: always linear
    front = pareto_front(list(zip(xs, ys)))
    for i, (_label, x, stat) in enumerate(pts):
        on = i in front
        ax.errorbar(
            x,
            stat.mean,
            yerr=stat.std or None,
            fmt="o",
            ms=8 if on else 6,
            color="C3" if on else "C0",
            mec="black" if on else "none",
            capsize=3,
            clip_on=False,
            zorder=3,
        )
    fx, fy = [xs[i] for i in front], [ys[i] for i in front]
    ax.step(fx, fy, where="post", color="C3", lw=1.2, alpha=0.8, label="Pareto front")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fig.suptitle(title, fontsize=10.5)
    ax.set_title(wrap(sub, 95), fontsize=7.5, color="0.3")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fit_ticks(ax, "x", xs, kind)  # fewer ticks where their labels would touch
    ax.legend(loc="best", fontsize=7.5)
    bars = [((x, lo), (x, hi)) for x, lo, hi in zip(xs, lows, highs) if hi > lo]
    steps = [((fx[i], fy[i]), (fx[i + 1], fy[i])) for i in range(len(fx) - 1)]
    steps += [((fx[i + 1], fy[i]), (fx[i + 1], fy[i + 1])) for i in range(len(fx) - 1)]
    label_points(ax, [(label, x, y) for (label, x, _), y in zip(pts, ys)], bars + steps)
    return save(fig, path)


def plot_per_class(series: dict[str, list[float | None]], counts: list[int] | None, path: str, title: str) -> str:
    """Grouped bars of per-class test accuracy (%), one colour per method; classes ordered by training count
    (head to tail) when `counts` are known, labelled `class (n)`. Returns `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    k = max((len(v) for v in series.values()), default=0)
    order = sorted(range(k), key=lambda c: -counts[c]) if counts and len(counts) == k else list(range(k))
    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(max(7.0, 0.35 * k * max(1, len(series)) ** 0.5 + 3.5), 3.8), dpi=120)
    for j, (label, accs) in enumerate(series.items()):
        ys = [100.0 * accs[c] if c < len(accs) and accs[c] is not None else np.nan for c in order]
        ax.bar(np.arange(k) + (j - (len(series) - 1) / 2) * width, ys, width, label=label)
    names = [f"{c}\n({counts[c]})" if counts and len(counts) == k else str(c) for c in order]
    ax.set_xticks(np.arange(k), names, fontsize=7 if k <= 20 else 5)
    ax.set_xlabel("class (training count), head to tail" if counts else "class")
    ax.set_ylabel("test accuracy %")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside: bars reach 100 %
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
