"""Accuracy-vs-cost plots with the Pareto front marked (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import os
import re
from typing import Any

from thrifty.bench.collect import MEAN_OF_GROUPS


PLOTS = {
    "saved_activation_bytes": ("accuracy_vs_saved_bytes.png", "bytes saved for backward (one training step)"),
    "adapter_bytes": ("accuracy_vs_adapter_bytes.png", "adapter file bytes (adapter_model.safetensors)"),
    "train_seconds": ("accuracy_vs_train_time.png", "training time (s, all epochs)"),
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


def plot_tradeoffs(rows: dict[str, dict[str, Any]], out_dir: str, title: str) -> list[str]:
    """One PNG per cost in PLOTS: x = mean cost over tasks, y = mean of group means (± std over seeds).

    A method with a group mean but no overall mean (it finished one group only, e.g. the text tasks) cannot be
    placed there; then each group also gets one PNG per cost, `<plot>-<group>.png`: y = that group's mean, x = the
    cost over that group's tasks, so every method that finished a group appears on some plot."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for key, (fname, xlabel) in PLOTS.items():
        pts = [
            (label, r["costs"][key], r[MEAN_OF_GROUPS])
            for label, r in rows.items()
            if r["costs"].get(key) is not None and r[MEAN_OF_GROUPS].mean is not None
        ]
        path = os.path.join(out_dir, fname)
        written.append(_plot(pts, path, xlabel + ", mean over tasks", f"top-1 % ({MEAN_OF_GROUPS})", title))
    groups = list(dict.fromkeys(g for r in rows.values() for g in r["groups"]))
    partial = any(
        r[MEAN_OF_GROUPS].mean is None and any(st.mean is not None for st in r["groups"].values())
        for r in rows.values()
    )
    if not partial or len(groups) < 2:
        return written
    for group in groups:
        for key, (fname, xlabel) in PLOTS.items():
            pts = [
                (label, r["group_costs"][group][key], r["groups"][group])
                for label, r in rows.items()
                if r["group_costs"][group].get(key) is not None and r["groups"][group].mean is not None
            ]
            if pts:
                stem, ext = os.path.splitext(fname)
                path = os.path.join(out_dir, f"{stem}-{re.sub(r'[^A-Za-z0-9_.]+', '_', group)}{ext}")
                ylabel = f"top-1 % ({group} mean)"
                written.append(_plot(pts, path, f"{xlabel}, mean over {group} tasks", ylabel, f"{title}: {group}"))
    return written


def _plot(pts: list[tuple[str, float, Any]], path: str, xlabel: str, ylabel: str, title: str) -> str:
    """Points (label, cost, Stat of accuracy) on a log cost axis with the Pareto front marked; returns `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    if pts:
        xs = [p[1] for p in pts]
        positive = [x for x in xs if x > 0]
        if positive and len(positive) == len(xs):
            ax.set_xscale("log")
        elif positive:  # zero cost (e.g. nothing saved for backward): symlog keeps it on the axis
            ax.set_xscale("symlog", linthresh=min(positive))
        front = pareto_front([(p[1], p[2].mean) for p in pts])
        for i, (label, x, stat) in enumerate(pts):
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
            )
            ax.annotate(label, (x, stat.mean), textcoords="offset points", xytext=(6, 5), fontsize=8)
        fx, fy = [pts[i][1] for i in front], [pts[i][2].mean for i in front]
        ax.step(fx, fy, where="post", color="C3", lw=1.2, alpha=0.8, label="Pareto front")
        ax.legend(loc="lower right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no complete results", ha="center", va="center", transform=ax.transAxes)
    if pts and max(xs) > 10 * max(min(xs), 1e-12):
        ax.xaxis.set_minor_formatter(NullFormatter())  # over a decade, log-axis minor labels overlap
    ax.margins(x=0.12, y=0.12)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


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
