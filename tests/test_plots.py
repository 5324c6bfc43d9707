"""Figures say something: the axis scale follows the data range, labelled ticks enclose the data, every point is
labelled inside the axes without overlaps, and the demo's bar chart keeps names and values readable."""

from __future__ import annotations

import itertools

import pytest

from thrifty.bench import figures
from thrifty.bench.figures import axis_scale, configure_axis, label_points, log_ticks, pyplot


def _boxes(fig, artists):
    """Display boxes; of a label, the text alone (an annotation's own box also covers its leader line)."""
    from matplotlib.text import Text

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    return [(Text if isinstance(a, Text) else type(a)).get_window_extent(a, renderer) for a in artists]


def _labelled_ticks(ax, which="x"):
    """(value, text) of the major ticks inside the axis limits, as drawn."""
    ax.figure.canvas.draw()
    axis = ax.xaxis if which == "x" else ax.yaxis
    lo, hi = sorted(ax.get_xlim() if which == "x" else ax.get_ylim())
    eps = 1e-9 * max(abs(lo), abs(hi), 1.0)
    return [(t.get_position()[0 if which == "x" else 1], t.get_text()) for t in axis.get_ticklabels()
            if lo - eps <= t.get_position()[0 if which == "x" else 1] <= hi + eps and t.get_text()]  # fmt: skip


@pytest.mark.parametrize(
    "values, scale",
    [
        ([0.09, 0.16], "linear"),  # the smoke report's training times: under a decade
        ([2.0, 7.2], "linear"),
        ([29.7 * 2**10, 7.57 * 2**20], "log"),  # bytes saved for backward: linear vs lora
        ([1.0, 10.0], "log"),  # exactly a decade
        ([0.0, 3e4, 8e6], "symlog"),  # a zero cost beside costs that span decades
        ([0.0, 5.0], "linear"),
        ([-1.0, 100.0], "linear"),
        ([42.0], "linear"),
        ([], "linear"),
    ],
)
def test_axis_scale_follows_the_data_range(values, scale):
    assert axis_scale(values) == scale


@pytest.mark.parametrize(
    "values, kind, unit",
    [
        ([0.09, 0.16], "seconds", " s"),
        ([1.93, 7.15], "seconds", " s"),
        ([29.7 * 2**10, 7.57 * 2**20], "bytes", "iB"),
        ([2826.0, 28768.0], "bytes", "KiB"),
        ([650.0, 6794.0, 1.3e7], "count", "M"),
        ([0.0, 3e4, 8e6], "bytes", "iB"),
        ([10.75, 20.5], "", ""),
        ([55.0], "", ""),
    ],
)
def test_labelled_ticks_enclose_the_data(values, kind, unit):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    configure_axis(ax, "x", values, kind)
    ticks = _labelled_ticks(ax)
    plt.close(fig)
    assert len(ticks) >= 3
    assert ticks[0][0] <= min(values) and ticks[-1][0] >= max(values)
    assert any(unit in text for _, text in ticks)


@pytest.mark.parametrize(
    "kind, v, text",
    [
        ("bytes", 7.57 * 2**20, "7.57 MiB"),
        ("bytes", 512.0, "512 B"),
        ("bytes", 0.0, "0"),
        ("count", 6794.0, "6.79K"),
        ("seconds", 0.16, "0.16 s"),
        ("seconds", 3000.0, "3000 s"),  # not 3e+03 s
        ("percent", 20.5, "20.5 %"),
    ],
)
def test_values_in_human_units(kind, v, text):
    assert figures.format_value(kind, v) == text


def test_log_ticks_thin_out_but_still_enclose():
    lo, hi = 27e3, 52e6
    for n in (6, 4, 3):
        t = log_ticks("bytes", lo, hi, n)
        assert t[0] <= lo and t[-1] >= hi and len(t) <= n + 1
    t = log_ticks("seconds", 0.5, 3.0)
    assert t == [0.5, 1.0, 2.0, 5.0]


def _labelled_figure(points, xkind="bytes"):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.6), dpi=100)
    xs, ys = [p[1] for p in points], [p[2] for p in points]
    ax.plot(xs, ys, "o", clip_on=False)
    configure_axis(ax, "x", xs, xkind)
    configure_axis(ax, "y", ys, scale="linear", pad=0.12)
    fig.tight_layout()
    label_points(ax, points)
    return fig, ax


def test_every_point_labelled_inside_the_axes_and_close_labels_apart():
    points = [
        ("linear", 29.7 * 2**10, 10.75),
        ("lora", 7.57 * 2**20, 20.5),  # the rightmost point: its label must not fall off the edge
        ("dtl", 72.9 * 2**20, 58.97),
        ("dtl_plus", 79.7 * 2**20, 58.70),  # almost on top of dtl
        ("adaptformer", 132 * 2**20, 60.27),
        ("bi_adaptformer-32bit", 179 * 2**20, 60.3),
    ]
    fig, ax = _labelled_figure(points)
    texts = [t for t in ax.texts if t.get_text()]
    assert sorted(t.get_text() for t in texts) == sorted(p[0] for p in points)
    frame, *boxes = _boxes(fig, [ax, *texts])
    for box in boxes:
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
    for a, b in itertools.combinations(boxes, 2):
        assert not a.overlaps(b), "two point labels overlap"
    pyplot().close(fig)


def test_points_at_one_place_share_a_label():
    fig, ax = _labelled_figure([("a", 1.0, 50.0), ("b", 1.0, 50.0), ("c", 3.0, 60.0)], xkind="seconds")
    assert sorted(t.get_text() for t in ax.texts) == ["a, b", "c"]
    pyplot().close(fig)


def test_demo_bar_chart_names_and_values_readable(tmp_path, monkeypatch):
    from thrifty.cli.demo import RECIPE, plot

    names = ["linear", "lora", "adaptformer", "bi_lora-1bit", "bi_adaptformer-1bit", "bi_adaptformer-32bit", "miet"]
    rows = [
        {
            "name": n,
            "test_accuracy": 0.3 + 0.02 * i,
            "adapter_bytes": 27e3 * 3**i,  # spans decades: log axis
            "saved_activation_bytes": 1e5 if n == "linear" else 2e8,
            "train_seconds": 60.0 + 20 * i,  # under a decade: linear axis
            "test_samples": 200,
        }
        for i, n in enumerate(names)
    ]
    seen = {}

    def spy(fig, path):
        seen["fig"] = fig
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        axes = fig.axes
        seen["scales"] = [ax.get_xscale() for ax in axes]
        labels = [t for t in axes[0].get_yticklabels() if t.get_text()]
        seen["names"] = [t.get_text() for t in labels]
        seen["name_boxes"] = [t.get_window_extent(renderer) for t in labels]
        seen["xtick_boxes"] = [
            [t.get_window_extent(renderer) for t in ax.get_xticklabels() if t.get_text()] for ax in axes
        ]
        seen["values"] = [
            (ax.get_window_extent(renderer), [t.get_window_extent(renderer) for t in ax.texts if t.get_text()])
            for ax in axes
        ]
        seen["title"] = fig._suptitle.get_text()
        return original(fig, path)

    original = figures.save
    monkeypatch.setattr(figures, "save", spy)
    env = {"device": "cpu", "cpu_count": 2, "cpu_model": "AMD EPYC", "versions": {"torch": "2.14.1"}}
    path = plot(rows, str(tmp_path / "demo.png"), {**RECIPE, "epochs": 1}, env)
    assert (tmp_path / "demo.png").stat().st_size > 1000 and path.endswith("demo.png")
    assert seen["names"] == names[::-1] or seen["names"] == names  # one row per method, every name shown
    for a, b in itertools.combinations(seen["name_boxes"], 2):
        assert not a.overlaps(b), "method names overlap"
    for boxes in seen["xtick_boxes"]:
        for a, b in zip(boxes, boxes[1:]):
            assert not a.overlaps(b), "x tick labels overlap"
    for frame, texts in seen["values"]:
        assert texts and all(frame.x0 <= t.x0 and t.x1 <= frame.x1 for t in texts)
    assert seen["scales"] == ["linear", "log", "log", "linear"]
    assert "minilm" in seen["title"] and "1 epoch," in seen["title"]
    sub = " ".join(t.get_text() for t in seen["fig"].texts)
    assert "CPU (AMD EPYC, 2 cores), torch 2.14.1" in sub


GPU_ENV = {"gpu": "NVIDIA H100 80GB HBM3", "cpu_count": 16, "versions": {"torch": "2.14.1"}}
CPU_ENV = {"device": "cpu", "cpu_model": "AMD EPYC", "cpu_count": 2, "versions": {"torch": "2.14.1"}}


@pytest.mark.parametrize(
    "env, words",
    [
        (GPU_ENV, "GPU (NVIDIA H100 80GB HBM3), torch 2.14.1"),
        (CPU_ENV, "CPU (AMD EPYC, 2 cores), torch 2.14.1"),
        ({}, "CPU"),
    ],
)
def test_machine_in_words(env, words):
    from thrifty.bench.report import env_words

    assert env_words(env) == words
