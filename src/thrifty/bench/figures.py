"""Figure helpers shared by the report's trade-off plots and `thrifty demo`'s bar chart (matplotlib, Agg).

- `axis_scale(values)`: log where the positive values span a decade or more, linear where they do not, symlog
  when zeros sit beside values that span decades (a zero cost stays on the axis).
- `configure_axis`: ticks in human units (KiB/MiB on base-2 steps for bytes, 1-2-5 steps for the rest) whose first
  and last labelled ticks enclose the data, so the labels cover the whole range.
- `label_points`: every point gets its label, placed at the first of a few offsets where it stays inside the axes
  and overlaps no other label, marker or the legend (the least overlapping offset when none is free).
- `bar_panels`: horizontal bars (names read left of the bars, never overlapping), one panel per quantity, each
  bar with its value written at its end.
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Sequence
from typing import Any


DECADE = 10.0  # max / min at or above this: log axis
BYTE_UNITS = ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB"))
COUNT_UNITS = ((1e9, "G"), (1e6, "M"), (1e3, "K"))
# label offsets in points from the point: right/left x above/below, above, below, then farther with a leader line
OFFSETS = [(6, 4), (6, -4), (-6, 4), (-6, -4), (0, 9), (0, -9)]
DIRECTIONS = [(1, 0), (0.7, 0.7), (0, 1), (-0.7, 0.7), (-1, 0), (-0.7, -0.7), (0, -1), (0.7, -0.7)]
FAR = [(round(r * dx), round(r * dy)) for r in (18, 30, 44) for dx, dy in DIRECTIONS]  # with a leader line


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def axis_scale(values: Sequence[float | None]) -> str:
    """'log' when all values are positive and span a decade (max >= 10 min); 'symlog' when zeros sit beside positive
    values that span a decade; 'linear' otherwise (negative values, one value, or less than a decade)."""
    vals = [float(v) for v in values if v is not None]
    pos = [v for v in vals if v > 0]
    if not pos or any(v < 0 for v in vals) or max(pos) < DECADE * min(pos):
        return "linear"
    return "log" if len(pos) == len(vals) else "symlog"


def format_value(kind: str, v: float, unit: tuple[float, str] | None = None) -> str:
    """`v` in human units: kind 'bytes' (IEC), 'count' (K/M/G), 'seconds', 'percent' or '' (plain)."""
    if kind in ("bytes", "count"):
        div, name = unit or _unit(kind, abs(v))
        text = f"{v / div:.3g}"
        return text + (f" {name}" if kind == "bytes" and v != 0 else name if v != 0 else "")
    if kind == "seconds":
        return f"{_num(v)} s" if v != 0 else "0"
    if kind == "percent":
        return f"{_num(v)} %"
    return _num(v)


def _num(v: float) -> str:
    """3 significant digits, never scientific notation for large numbers (2000, not 2e+03)."""
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def _unit(kind: str, vmax: float) -> tuple[float, str]:
    units = BYTE_UNITS if kind == "bytes" else COUNT_UNITS if kind == "count" else ()
    for div, name in units:
        if vmax >= div:
            return div, name
    return 1.0, "B" if kind == "bytes" else ""


def _decimal(mantissa: int, exponent: int) -> float:
    return float(f"{mantissa}e{exponent}")  # 2e-1 exactly as written, no 0.20000000000000004


def log_ticks(kind: str, lo: float, hi: float, max_ticks: int = 6) -> list[float]:
    """Ticks on a log axis from the largest tick <= lo to the smallest >= hi (0 < lo <= hi), about `max_ticks`:
    every k-th power of 2 for bytes, else 1-2-5 or 1-3 per decade or every k-th power of 10."""
    if kind == "bytes":
        k0, k1 = math.floor(math.log2(lo)), math.ceil(math.log2(hi))
        step = max(1, math.ceil((k1 - k0) / max(max_ticks - 1, 1)))
        k0 -= k0 % step
        ticks = [2.0**k for k in range(k0, k1 + step, step)]
    else:
        d0, d1 = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
        n = d1 - d0
        subs = (1, 2, 5) if 3 * n <= max_ticks + 1 else (1, 3) if 2 * n <= max_ticks + 1 else (1,)
        step = max(1, math.ceil(n / max(max_ticks - 1, 1)))
        d0 -= d0 % step
        ticks = [_decimal(s, d) for d in range(d0, d1 + 1, step) for s in subs]
    first = max(i for i, t in enumerate(ticks) if t <= lo * (1 + 1e-9))
    last = min(i for i, t in enumerate(ticks) if t >= hi * (1 - 1e-9))
    return ticks[first : last + 1]


def linear_ticks(kind: str, lo: float, hi: float, max_ticks: int = 6) -> list[float]:
    """At most about `max_ticks` round ticks (in the unit that fits the range: MiB steps for MiB values) enclosing
    [lo, hi]."""
    from matplotlib.ticker import MaxNLocator

    div, _ = _unit(kind, max(abs(lo), abs(hi)))
    raw = MaxNLocator(nbins=max(max_ticks - 1, 1), steps=[1, 2, 2.5, 5, 10]).tick_values(lo / div, hi / div)
    ticks = [float(f"{t:.12g}") * div for t in raw]
    first = max(i for i, t in enumerate(ticks) if t <= lo + 1e-12 * max(1.0, abs(lo)))
    last = min(i for i, t in enumerate(ticks) if t >= hi - 1e-12 * max(1.0, abs(hi)))
    return ticks[first : last + 1]


def configure_axis(
    ax,
    which: str,
    values: Sequence[float],
    kind: str = "",
    pad: float = 0.07,
    bars: bool = False,
    scale: str = "",
    max_ticks: int = 6,
) -> str:
    """Scale (`axis_scale`, or `scale` when given), limits and labelled ticks of `ax`'s x or y axis for `values`;
    returns the scale.

    The first labelled tick is at or below the smallest value and the last at or above the largest (a point on the
    first tick of a non-negative axis gets a little room below it instead of a negative tick). `bars`: the axis
    starts at 0 (linear) or at the first tick (log) and bars are drawn from there."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator

    vals = [float(v) for v in values if v is not None] or [0.0, 1.0]
    scale = scale or axis_scale(vals)
    lo, hi = min(vals), max(vals)
    axis = ax.xaxis if which == "x" else ax.yaxis
    set_scale, set_lim = (ax.set_xscale, ax.set_xlim) if which == "x" else (ax.set_yscale, ax.set_ylim)
    if scale == "linear":
        if bars:
            lo = min(lo, 0.0)
        span = hi - lo or (abs(hi) or 1.0)
        plo, phi = (lo, hi + pad * span) if bars else (lo - pad * span, hi + pad * span)
        ticks = linear_ticks(kind, max(plo, 0.0) if lo >= 0 else plo, phi, max_ticks)
        limits = (min(ticks[0], plo), ticks[-1])
        set_scale("linear")
        unit = _unit(kind, max(abs(t) for t in ticks))
        axis.set_major_formatter(FuncFormatter(lambda v, _pos: format_value(kind, v, unit)))
    else:
        pos = [v for v in vals if v > 0]
        f = (max(pos) / min(pos)) ** pad
        ticks = log_ticks(kind, min(pos) / f, max(pos) * f, max_ticks)
        if scale == "log":
            set_scale("log")
            limits = (ticks[0], ticks[-1])
        else:
            set_scale("symlog", linthresh=ticks[0], linscale=0.6)
            limits = (-0.25 * ticks[0], ticks[-1])
            ticks = [0.0, *ticks]
        axis.set_major_formatter(FuncFormatter(lambda v, _pos: format_value(kind, v)))
    axis.set_major_locator(FixedLocator(ticks))
    axis.set_minor_locator(NullLocator())
    axis.set_minor_formatter(NullFormatter())
    set_lim(*limits)
    return scale


def tick_labels_overlap(ax, which: str, gap_pt: float = 8.0) -> bool:
    """Whether two neighbouring tick labels of the axis come closer than `gap_pt` points (after a draw)."""
    fig = ax.figure
    gap = gap_pt * fig.dpi / 72
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    axis = ax.xaxis if which == "x" else ax.yaxis
    boxes = [t.get_window_extent(renderer) for t in axis.get_ticklabels() if t.get_visible() and t.get_text()]
    lo, hi = (0, 2) if which == "x" else (1, 3)  # extents index: x0, y0, x1, y1
    boxes.sort(key=lambda b: b.extents[lo])
    return any(b.extents[lo] - a.extents[hi] < gap for a, b in zip(boxes, boxes[1:]))


def fit_ticks(ax, which: str, values: Sequence[float], kind: str = "", max_ticks: int = 6, **kw) -> str:
    """`configure_axis`, then fewer ticks until neighbouring tick labels no longer touch; returns the scale.
    Call after the layout is final (it measures the labels)."""
    scale = configure_axis(ax, which, values, kind, max_ticks=max_ticks, **kw)
    while max_ticks > 2 and tick_labels_overlap(ax, which):
        max_ticks -= 1
        scale = configure_axis(ax, which, values, kind, max_ticks=max_ticks, **kw)
    return scale


def _overlap(a, b) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


def _seg_in_box(p, q, box) -> float:
    """Length of the segment p-q inside `box` (Liang-Barsky clipping), in pixels."""
    (x0, y0), (dx, dy) = p, (q[0] - p[0], q[1] - p[1])
    t0, t1 = 0.0, 1.0
    for pk, qk in ((-dx, x0 - box.x0), (dx, box.x1 - x0), (-dy, y0 - box.y0), (dy, box.y1 - y0)):
        if pk == 0:
            if qk < 0:
                return 0.0
        elif pk < 0:
            t0 = max(t0, qk / pk)
        else:
            t1 = min(t1, qk / pk)
    return max(0.0, t1 - t0) * math.hypot(dx, dy)


def label_points(
    ax,
    points: Sequence[tuple[str, float, float]],
    segments: Sequence[tuple[tuple[float, float], tuple[float, float]]] = (),
    fontsize: float = 8,
    marker_pt: float = 8,
) -> list:
    """Annotate each (label, x, y) inside the axes without overlaps where possible; returns the annotations.

    Each label tries offsets near its point, then farther ones with a leader line, and takes the first that stays
    inside the axes and touches no other label, leader line, marker, the legend or `segments` (data-coordinate
    line pieces: error bars, a front line); the least-touching one when none is free. Crowded points choose first.
    Call after the axes' limits, the layout (tight_layout) and any legend are final: placement is measured in
    display space. Points at the same place share one label ("a, b")."""
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    merged: dict[tuple[float, float], list[str]] = {}
    for label, x, y in points:
        merged.setdefault((x, y), []).append(label)
    r = marker_pt / 2 * fig.dpi / 72
    px = {xy: tuple(ax.transData.transform(xy)) for xy in merged}
    markers = {xy: Bbox.from_extents(u - r, v - r, u + r, v + r) for xy, (u, v) in px.items()}
    boxes = list(markers.values())  # obstacles: markers, legend, placed labels
    legend = ax.get_legend()
    if legend is not None:
        boxes.append(legend.get_window_extent(renderer))
    lines = [(tuple(ax.transData.transform(a)), tuple(ax.transData.transform(b))) for a, b in segments]
    crowd = {xy: sum(math.dist(px[xy], px[o]) < 60 for o in merged) for xy in merged}
    placed = []
    for xy in sorted(merged, key=lambda k: -crowd[k]):
        best, best_cost = None, math.inf
        for i, (dx, dy) in enumerate(OFFSETS + FAR):
            ha = "left" if dx > 0 else "right" if dx < 0 else "center"
            va = "bottom" if dy > 0 else "top" if dy < 0 else "center"
            far = i >= len(OFFSETS)
            arrow = {"arrowstyle": "-", "color": "0.55", "lw": 0.6, "shrinkA": 1, "shrinkB": r} if far else None
            ann = ax.annotate(
                ", ".join(merged[xy]), xy, xytext=(dx, dy), textcoords="offset points", ha=ha, va=va,
                fontsize=fontsize, arrowprops=arrow, annotation_clip=False,
            )  # fmt: skip
            ann.update_positions(renderer)
            box = Text.get_window_extent(ann, renderer)  # the text alone, without its leader line
            cost = 50.0 * (box.width * box.height - _overlap(box, frame))
            cost += sum(_overlap(box, b) for b in boxes) + 3 * sum(_seg_in_box(a, b, box) for a, b in lines)
            lead = None
            if far:  # from the marker's edge to the nearest point of the text box
                u, v = px[xy]
                end = (min(max(u, box.x0), box.x1), min(max(v, box.y0), box.y1))
                d = math.dist((u, v), end) or 1.0
                lead = ((u + (end[0] - u) * r / d, v + (end[1] - v) * r / d), end)
                cost += 3 * sum(_seg_in_box(*lead, b) for b in boxes if b is not markers[xy]) + 0.5
            if cost < best_cost:
                if best is not None:
                    best[0].remove()
                best, best_cost = (ann, box, lead), cost
                if cost <= 0.5:
                    break
            else:
                ann.remove()
        boxes.append(best[1])
        if best[2] is not None:
            lines.append(best[2])
        placed.append(best[0])
    return placed


def wrap(text: str, width: int = 90) -> str:
    return "\n".join(textwrap.wrap(text, width)) if text else ""


def save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    fig.savefig(path)
    pyplot().close(fig)
    return path


def bar_panels(
    names: Sequence[str], panels: Sequence[dict[str, Any]], path: str, title: str, subtitle: str = ""
) -> str:
    """One horizontal bar chart per panel, methods as rows (first on top, names once at the left).

    panels: [{'title', 'values' (one per name, None = not measured), 'kind' (for `format_value`), 'ref': optional
    (value, label) drawn as a dashed line}]. The axis of each panel follows `configure_axis`; each value is written
    at the end of its bar and the axis widened until every value text lies inside it."""
    plt = pyplot()
    n = len(names)
    fig, axes = plt.subplots(1, len(panels), sharey=True, figsize=(3.9 * len(panels), 1.7 + 0.36 * n), dpi=120)
    axes = list(axes) if len(panels) > 1 else [axes]
    ys = list(range(n))[::-1]
    texts = []
    for ax, panel in zip(axes, panels):
        values, kind = panel["values"], panel.get("kind", "")
        measured = [v for v in values if v is not None]
        scale = configure_axis(ax, "x", measured, kind, bars=True)
        start = min((v for v in measured if v > 0), default=1.0) * 1e-3 if scale == "log" else 0.0  # clipped
        for y, v in zip(ys, values):
            if v is None:
                ax.text(
                    0.02, y, "not measured", transform=ax.get_yaxis_transform(), va="center", fontsize=8, color="0.4"
                )
                continue
            ax.barh(y, v - start, left=start, height=0.62, color="#4c72b0")
            t = ax.annotate(
                value_text(kind, v), (v, y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8
            )
            texts.append((ax, t))
        if panel.get("ref") is not None:
            rv, rl = panel["ref"]
            ax.axvline(rv, color="C3", ls="--", lw=1)
            ax.annotate(rl, (rv, 1.0), xycoords=("data", "axes fraction"), xytext=(2, -2), textcoords="offset points",
                        va="top", fontsize=7, color="C3")  # fmt: skip
        ax.set_title(panel["title"], fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        ax.set_axisbelow(True)
    axes[0].set_yticks(ys, list(names), fontsize=9)
    axes[0].set_ylim(-0.6, n - 0.4)
    fig.suptitle(title, fontsize=11)
    if subtitle:
        fig.text(0.5, 0.005, wrap(subtitle, 150), ha="center", va="bottom", fontsize=7.5, color="0.3")
    fig.tight_layout(rect=(0, 0.05 if subtitle else 0, 1, 1))
    for ax, panel in zip(axes, panels):
        measured = [v for v in panel["values"] if v is not None]
        fit_ticks(ax, "x", measured, panel.get("kind", ""), bars=True)
    _fit_texts(fig, texts)
    return save(fig, path)


def value_text(kind: str, v: float) -> str:
    """A value written beside its bar: one decimal for percentages, else `format_value`."""
    return f"{v:.1f} %" if kind == "percent" else format_value(kind, v)


def _fit_texts(fig, texts: list) -> None:
    """Widen each axis to the right until the value texts written at the bars' ends lie inside it: a text anchored
    at pixel p with width w needs x_lo + (p - x_lo) / stretch + w <= x_hi - 2."""
    for _ in range(3):
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        grown = False
        for ax in dict.fromkeys(a for a, _ in texts):
            frame = ax.get_window_extent(renderer)
            stretch = 1.0
            for a, t in texts:
                box = t.get_window_extent(renderer)
                if a is ax and box.x1 > frame.x1 - 1:
                    p = ax.transData.transform(t.xy)[0] if hasattr(t, "xy") else box.x0
                    room = frame.x1 - 2 - (box.x1 - p) - frame.x0
                    stretch = max(stretch, (p - frame.x0) / max(room, 1.0))
            if stretch > 1.0:
                x_new = frame.x0 + (frame.x1 - frame.x0) * stretch
                ax.set_xlim(ax.get_xlim()[0], ax.transData.inverted().transform((x_new, 0))[0])
                grown = True
        if not grown:
            return
