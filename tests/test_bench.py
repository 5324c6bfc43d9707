"""The bench harness without training: suite files, the means of the report on hand-made results, resume logic
(complete cells skipped, missing ones run, half-done ones resumed) and failed cells shown as failed."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest

from thrifty.bench import MEAN_OF_GROUPS, MEAN_OF_TASKS, aggregate, build_report, collect, expand, pareto_front
from thrifty.bench.runner import CHECKPOINT, FAILED, RESULTS, cell_state, run_cells, write_manifest
from thrifty.bench.suite import find_suite, load_suite, parse_suite
from thrifty.data.vtab import VTAB_TASKS
from thrifty.errors import ConfigError


GRID = {
    "name": "toy",
    "seeds": [0, 1],
    "defaults": {"backbone": "timm:test_vit", "random-init": True, "epochs": 3, "set": {"dropout": 0.0}},
    "tasks": [
        {"name": "t1", "group": "A", "data": "digits:1k"},
        {"name": "t2", "group": "A", "data": "digits:1k", "epochs": 4},
        {"name": "t3", "group": "B", "data": "fashion-mnist:1k", "image_size": 32},
    ],
    "methods": {
        "m": {"method": "lora", "set": {"r": 4, "target_modules": ["qkv", "proj"]}},
        "m2": {"method": "lora", "lr": 0.01, "tasks": {"t2": {"lr": 0.5, "set": {"r": 2}}}},
    },
}


def _suite(**changes):
    return parse_suite({**GRID, **changes}, source="toy.yaml")


# --- suites ------------------------------------------------------------------------------------------------------


def test_layers_override_in_order_and_become_train_flags():
    cells = {(c.task, c.label, c.seed): c for c in expand(_suite())}
    assert len(cells) == 3 * 2 * 2
    c = cells[("t2", "m2", 1)]
    assert (c.method, c.flags["epochs"], c.flags["lr"]) == ("lora", 4, 0.5)  # task < method < method.tasks
    assert c.sets == {"dropout": "0.0", "r": "2"}
    assert cells[("t1", "m2", 0)].flags["lr"] == 0.01
    argv = cells[("t3", "m", 0)].argv("OUT")
    assert argv[:6] == ["--method", "lora", "--seed", "0", "--output", "OUT"]
    assert "--random-init" in argv and argv[argv.index("--image-size") + 1] == "32"
    assert argv[argv.index("--set", argv.index("r=4") - 1) + 1] == "r=4" and "target_modules=qkv,proj" in argv


def test_any_registered_method_and_subsets():
    cells = expand(_suite(), methods=["adaptformer"], tasks=["t3"], seeds=[7], overrides={"epochs": 1})
    assert [(c.task, c.label, c.method, c.seed, c.flags["epochs"]) for c in cells] == [
        ("t3", "adaptformer", "adaptformer", 7, 1)
    ]
    with pytest.raises(ConfigError, match="unknown task"):
        expand(_suite(), tasks=["nope"])


@pytest.mark.parametrize(
    "change, message",
    [
        ({"defaults": {"backbone": "x", "epoch": 3}}, "unknown option `epoch`"),
        ({"defaults": {"backbone": "x", "seed": 3}}, "set by `thrifty bench`"),
        ({"tasks": []}, "non-empty list"),
        ({"methods": {"m": {"tasks": {"zz": {}}}}}, "unknown task 'zz'"),
        ({"seeds": ["a"]}, "list of integers"),
        ({"extra": 1}, "unknown top-level"),
    ],
)
def test_bad_suites_raise_config_errors(change, message):
    with pytest.raises(ConfigError, match=message):
        expand(_suite(**change))


def test_placeholders():
    tasks = [{"name": "cifar", "data": "vtab:{data_root}/cifar", "checkpoint": "{checkpoint}"}]
    suite = _suite(tasks=tasks, methods={"m": {}})
    with pytest.raises(ConfigError, match="--data-root"):
        expand(suite)
    (c, *_) = expand(suite, data_root="/d")
    assert c.flags["data"] == "vtab:/d/cifar" and "checkpoint" not in c.flags  # no --checkpoint: default weights
    (c, *_) = expand(suite, data_root="/d", checkpoint="/w/ViT-B_16.npz")
    assert c.flags["checkpoint"] == "/w/ViT-B_16.npz"
    with pytest.raises(ConfigError, match="does not use"):
        expand(_suite(), checkpoint="/w/ViT-B_16.npz")


def test_shipped_suites_parse():
    vtab = load_suite(find_suite("vtab1k"))
    assert [(t.name, t.group) for t in vtab.tasks] == [(k, g) for k, (g, _) in VTAB_TASKS.items()]
    cells = expand(vtab, data_root="/data/vtab-1k", checkpoint="/w/ViT-B_16.npz", methods=["lora"], seeds=[0])
    assert len(cells) == 19
    assert cells[0].flags["backbone"] == "timm:vit_base_patch16_224.orig_in21k"
    assert cells[0].flags["data"] == "vtab:/data/vtab-1k/cifar"
    assert (cells[0].flags["lr"], cells[0].flags["batch_size"], cells[0].flags["epochs"]) == (1e-3, 64, 100)
    offline = load_suite(find_suite("offline"))
    assert [t.group for t in offline.tasks] == ["text", "text", "vision", "vision"]
    cells = expand(offline)
    # linear/full/lora/adaptformer on 4 tasks, dtl/dtl_plus/last on both text tasks, 5 rows on reviews only
    assert len(cells) == 3 * (4 * 4 + 3 * 2 + 5)
    assert not any(c.task != "reviews" and c.method == "miet" for c in cells)
    assert len(expand(load_suite(find_suite("smoke")))) == 4
    with pytest.raises(ConfigError, match="unknown suite"):
        find_suite("no-such-suite")


# --- the report's arithmetic on hand-made results -----------------------------------------------------------------

ACC = {  # (method, task, seed) -> test accuracy; None = the cell failed
    ("m", "t1", 0): 0.60, ("m", "t2", 0): 0.80, ("m", "t3", 0): 0.50,
    ("m", "t1", 1): 0.70, ("m", "t2", 1): 0.90, ("m", "t3", 1): 0.40,
    ("m2", "t1", 0): 0.50, ("m2", "t2", 0): 0.50, ("m2", "t3", 0): 0.30,
    ("m2", "t1", 1): 0.50, ("m2", "t2", 1): 0.70, ("m2", "t3", 1): None,
    ("bad", "t1", 0): None, ("bad", "t1", 1): None, ("bad", "t2", 0): 0.9, ("bad", "t2", 1): 0.9,
    ("bad", "t3", 0): 0.9, ("bad", "t3", 1): 0.9,
}  # fmt: skip


def _results(acc: float, seed: int, saved: int) -> dict:
    return {
        "status": "complete",
        "created": "2026-01-02T03:04:05+00:00",
        "seed": seed,
        "train": {
            "epochs": 2,
            "batch_size": 8,
            "lr": 1e-3,
            "weight_decay": 0.0,
            "warmup_epochs": 0,
            "select_on_val": False,
        },
        "history": [{"epoch": 0, "seconds": 1.5}, {"epoch": 1, "seconds": 2.5}],
        "env": {
            "device": "cpu",
            "cpu_count": 2,
            "torch_threads": 2,
            "platform": "Linux",
            "versions": {"torch": "2.14.1"},
        },
        "metrics": {
            "test_accuracy": acc,
            "trainable_params": 1000,
            "adapter_bytes": 4096,
            "saved_activation_bytes": saved,
            "peak_memory_bytes": 2**20,
            "seconds_per_epoch": 2.0,
            "measured_batch_size": 8,
        },
    }


@pytest.fixture
def results_dir(tmp_path):
    write_manifest(str(tmp_path), _suite(methods={"m": {}, "m2": {}, "bad": {}}))
    for (label, task, seed), acc in ACC.items():
        d = tmp_path / task / label / f"seed{seed}"
        d.mkdir(parents=True)
        if acc is None:
            (d / FAILED).write_text(json.dumps({"returncode": 1, "stderr_tail": "Traceback\nValueError: boom\n"}))
        else:
            (d / RESULTS).write_text(json.dumps(_results(acc, seed, 1000 if label == "m" else 10)))
            run = {"loadavg_at_start": 3.5 if seed else 0.5, "wall_seconds": 60.0 + 30 * seed, "cpu_seconds": 90.0}
            (d / "cell.json").write_text(json.dumps({"last_run": run}))
    return str(tmp_path)


def test_report_means_on_hand_made_results(results_dir):
    layout, cells = collect(results_dir)
    assert [t for t, _ in layout.tasks] == ["t1", "t2", "t3"] and layout.methods == ["m", "m2", "bad"]
    rows = aggregate(layout, cells)
    m = rows["m"]
    # task means and sample stds (ddof=1): t1 = 65 ± 7.07 over 60, 70
    assert m["tasks"]["t1"].stat.mean == pytest.approx(65.0)
    assert m["tasks"]["t1"].stat.std == pytest.approx(math.sqrt(50.0))
    # groups: A = mean(65, 85) = 75, B = 45; mean of group means 60 differs from the mean of tasks 65
    assert m["groups"]["A"].mean == pytest.approx(75.0) and m["groups"]["B"].mean == pytest.approx(45.0)
    assert m[MEAN_OF_GROUPS].mean == pytest.approx(60.0)
    assert m[MEAN_OF_TASKS].mean == pytest.approx(65.0)
    # spread of the per-seed aggregates: groups 70/50 and 80/40 -> 60 both seeds; tasks 63.33 and 66.67
    assert m[MEAN_OF_GROUPS].std == pytest.approx(0.0)
    assert m[MEAN_OF_TASKS].std == pytest.approx(math.sqrt(2 * (10 / 6) ** 2))
    assert m["costs"]["train_seconds"] == pytest.approx(4.0) and m["costs"]["saved_activation_bytes"] == 1000
    # m2: t3 has one of two seeds -> its mean is that seed; aggregates over seeds use only complete seeds
    m2 = rows["m2"]
    assert m2["tasks"]["t3"].stat.n == 1 and m2["tasks"]["t3"].failed == [1]
    assert m2[MEAN_OF_TASKS].mean == pytest.approx((50 + 60 + 30) / 3) and m2[MEAN_OF_TASKS].n == 1
    # bad: every t1 run failed -> t1 'failed', group A and both overall means n/a, group B still reported
    bad = rows["bad"]
    assert bad["tasks"]["t1"].status == "failed"
    assert bad["groups"]["A"].mean is None and bad["groups"]["B"].mean == pytest.approx(90.0)
    assert bad[MEAN_OF_GROUPS].mean is None and bad[MEAN_OF_TASKS].mean is None


def test_report_files_show_failed_and_label_both_means(results_dir, tmp_path):
    docs = tmp_path / "docs" / "benchmarks.md"
    out = build_report(results_dir, docs=str(docs))
    md = Path(out["markdown"]).read_text()
    header, _, row_m, row_m2, row_bad = out["table"].splitlines()
    assert "| mean of group means | mean of tasks |" in header and "A mean | B mean" in header
    assert row_m.startswith("| m | 65.0 ± 7.1 | 85.0 ± 7.1 | 45.0 ± 7.1 | 75.00 ± 7.07 | 45.00 ± 7.07 |")
    assert "| **60.00 ± 0.00** | **65.00 ± 2.36** |" in row_m
    assert "30.0 (1/2, 1 failed)" in row_m2
    assert row_bad.startswith("| bad | failed | 90.0 ± 0.0 | 90.0 ± 0.0 | n/a | 90.00 ± 0.00 | **n/a** | **n/a** |")
    assert "final epoch" in md and "never for selection" in md and "Seeds: 0, 1" in md
    assert "mean of the group means" in md and "plain mean over the 3 tasks" in md
    assert "`t1/bad/seed0`: exit code 1: `ValueError: boom`" in md
    assert "Machine: device cpu" in md and "torch 2.14.1" in md
    assert "load average when the cells started: 0.5 to 3.5 on 2 cores (busier than its cores" in md
    # cost of the grid: m has 6 complete cells (3 tasks x seeds 0, 1): wall 3 x (60 + 90) s = 7.5 min, CPU 9 min
    assert "| m | 6 | 7.5 | 9.0 | 2.0 |" in md and "| bad | 4 | 5.0 | 6.0 | 2.0 |" in md
    assert "| **all** | 15 |" in md
    csv_lines = Path(out["csv"]).read_text().splitlines()
    assert csv_lines[0].startswith("method,t1,t1_std,t1_n,t2,")
    assert csv_lines[3].startswith("bad,failed,,0,90,0,2,")
    assert all(os.path.getsize(p) > 1000 for p in out["plots"])
    page = docs.read_text()
    assert "](benchmarks/accuracy_vs_saved_bytes.png)" in page and (docs.parent / "benchmarks").is_dir()
    assert "benchmarks-more.md" not in page  # linked only when the hand-written page exists
    (docs.parent / "benchmarks-more.md").write_text("# More\n")
    build_report(results_dir, docs=str(docs))
    assert "[benchmarks-more.md](benchmarks-more.md)" in docs.read_text()


def test_methods_missing_a_group_get_per_group_plots(results_dir, tmp_path, monkeypatch):
    from thrifty.bench import plots

    drawn = {}
    original = plots._plot

    def spy(pts, path, *args):
        drawn[os.path.basename(path)] = sorted(label for label, _, _ in pts)
        return original(pts, path, *args)

    monkeypatch.setattr(plots, "_plot", spy)
    out = build_report(results_dir, report_dir=str(tmp_path / "report"))
    # `bad` has no group-A mean, so no mean of group means: absent from the overall plots, present in group B's
    assert drawn["accuracy_vs_saved_bytes.png"] == ["m", "m2"]
    assert drawn["accuracy_vs_saved_bytes-B.png"] == ["bad", "m", "m2"]
    assert drawn["accuracy_vs_saved_bytes-A.png"] == ["m", "m2"]
    assert len(out["plots"]) == 9 and all(os.path.getsize(p) > 1000 for p in out["plots"])
    assert "per-group plots" in Path(out["markdown"]).read_text()


def _fail_cells(root: str, task: str | None = None) -> None:
    """Turn the complete cells of `task` (all tasks: None) into failed ones."""
    for results in Path(root).glob(f"{task or '*'}/*/seed*/{RESULTS}"):
        results.unlink()
        (results.parent / FAILED).write_text(json.dumps({"returncode": 1, "stderr_tail": "DataError: not found"}))


def _figure_spy(monkeypatch) -> dict:
    """Records, per plot file written, its title texts, the axes' text artists and the x scale."""
    from thrifty.bench import plots

    seen = {}
    original = plots.save

    def spy(fig, path):
        ax = fig.axes[0]
        seen[os.path.basename(path)] = {
            "title": fig._suptitle.get_text() + " | " + ax.get_title(),
            "texts": [t.get_text() for t in ax.texts],
            "xscale": ax.get_xscale(),
        }
        return original(fig, path)

    monkeypatch.setattr(plots, "save", spy)
    return seen


def test_every_plot_has_points_titles_in_words_and_labelled_points(results_dir, monkeypatch):
    seen = _figure_spy(monkeypatch)
    out = build_report(results_dir)
    drawn = {os.path.basename(p) for p in out["plots"]}
    assert drawn == set(seen) and len(drawn) == 9  # `bad` lacks group A: overall + per-group plots
    saved = seen["accuracy_vs_saved_bytes.png"]
    assert saved["title"].startswith("toy: top-1 % vs bytes saved for backward | 2 methods")
    assert "CPU (2 cores), torch 2.14.1" in saved["title"]
    assert "shared machine: load 0.5 to 3.5 on 2 cores" in seen["accuracy_vs_train_time.png"]["title"]
    assert sorted(saved["texts"]) == ["m", "m2"]  # every point labelled
    assert sorted(seen["accuracy_vs_saved_bytes-B.png"]["texts"]) == ["bad", "m", "m2"]
    # bytes saved: 1000 (m) vs 10 (m2): two decades -> log; the same 4096 adapter bytes and 4 s everywhere -> linear
    assert saved["xscale"] == "log"
    assert seen["accuracy_vs_adapter_bytes.png"]["xscale"] == "linear"
    assert seen["accuracy_vs_train_time.png"]["xscale"] == "linear"


def test_no_empty_overall_plot_and_no_link_to_a_missing_file(results_dir, tmp_path):
    docs = tmp_path / "docs" / "benchmarks.md"
    first = build_report(results_dir, docs=str(docs))
    assert "accuracy_vs_train_time.png" in {os.path.basename(p) for p in first["plots"]}
    _fail_cells(results_dir, "t3")  # group B (t3) fails for every method: no method has a mean of group means
    out = build_report(results_dir, docs=str(docs))
    names = sorted(os.path.basename(p) for p in out["plots"])
    assert names == [
        "accuracy_vs_adapter_bytes-A.png",
        "accuracy_vs_saved_bytes-A.png",
        "accuracy_vs_train_time-A.png",
    ]
    report_dir = os.path.dirname(out["markdown"])
    # the earlier report's overall plots are gone from both folders, not left behind unlinked
    assert sorted(f for f in os.listdir(report_dir) if f.endswith(".png")) == names
    assert sorted(f for f in os.listdir(docs.parent / "benchmarks") if f.endswith(".png")) == names
    for page, folder in ((Path(out["markdown"]), report_dir), (docs, str(docs.parent))):
        text = page.read_text()
        links = re.findall(r"!\[[^]]*\]\(([^)]+)\)", text)
        assert len(links) == 3 and all(os.path.exists(os.path.join(folder, link)) for link in links)
        assert "overall plots are left out" in text and "No plot for B" in text
    _fail_cells(results_dir)  # nothing complete at all: no plot, and the page says so
    out = build_report(results_dir, docs=str(docs))
    assert out["plots"] == [] and not [f for f in os.listdir(report_dir) if f.endswith(".png")]
    assert "No trade-off plots" in docs.read_text() and "![" not in docs.read_text()


def test_pareto_front():
    pts = [(1.0, 50.0), (2.0, 60.0), (3.0, 55.0), (2.0, 40.0), (4.0, 60.0), (0.5, 10.0)]
    assert pareto_front(pts) == [5, 0, 1]


# --- resume logic (fake launcher: no training) ------------------------------------------------------------------


class FakeLauncher:
    """Records the argv of each launch; writes a complete results.json unless the cell is in `fail`."""

    def __init__(self, fail=()):
        self.calls, self.fail = [], set(fail)

    def __call__(self, argv, cell_dir, timeout):
        self.calls.append((os.path.relpath(cell_dir, self.root), argv))
        if os.path.relpath(cell_dir, self.root) in self.fail:
            return 3, "Traceback (most recent call last):\nRuntimeError: out of memory\n"
        with open(os.path.join(cell_dir, RESULTS), "w") as fh:
            json.dump({"status": "complete", "metrics": {"test_accuracy": 0.5}}, fh)
        if os.path.exists(os.path.join(cell_dir, CHECKPOINT)):
            os.remove(os.path.join(cell_dir, CHECKPOINT))
        return 0, ""


def _run(tmp_path, launcher, **kw):
    launcher.root = str(tmp_path)
    cells = expand(_suite(), methods=["m"], seeds=[0])
    lines = []
    counts = run_cells(cells, str(tmp_path), launch=launcher, log=lines.append, **kw)
    return cells, counts, lines


def test_complete_cells_skipped_missing_run_partial_resumed_failed_recorded(tmp_path):
    first = FakeLauncher(fail={os.path.join("t3", "m", "seed0")})
    cells, counts, lines = _run(tmp_path, first)
    assert [c for c, _ in first.calls] == [c.rel_dir() for c in cells]
    assert counts == {"complete": 0, "ran": 2, "failed": 1, "stale": 0, "skipped_failed": 0}
    failed = json.loads((tmp_path / "t3" / "m" / "seed0" / FAILED).read_text())
    assert failed["returncode"] == 3 and "out of memory" in failed["stderr_tail"]
    assert failed["command"][-len(first.calls[2][1]) :] == first.calls[2][1]
    assert any("FAILED (exit 3)" in line and "out of memory" in line for line in lines)
    assert "[3/3]" in lines[-1] and "ETA" in lines[-1]
    # rerun: the two complete cells are skipped; the failed one is retried from scratch and now succeeds
    (tmp_path / "t1" / "m" / "seed0" / RESULTS).unlink()
    (tmp_path / "t1" / "m" / "seed0" / CHECKPOINT).write_text("half-done")  # interrupted mid-run
    second = FakeLauncher()
    _, counts, _ = _run(tmp_path, second)
    assert [(c, a[-1]) for c, a in second.calls] == [
        (os.path.join("t1", "m", "seed0"), "--resume"),
        (os.path.join("t3", "m", "seed0"), "--overwrite"),
    ]
    assert counts["complete"] == 1 and counts["ran"] == 2
    assert not (tmp_path / "t3" / "m" / "seed0" / FAILED).exists()
    # third run: nothing to do
    third = FakeLauncher()
    _, counts, _ = _run(tmp_path, third)
    assert third.calls == [] and counts["complete"] == 3


def test_changed_spec_is_stale_not_silently_reused(tmp_path):
    _run(tmp_path, FakeLauncher())
    suite = _suite(defaults={**GRID["defaults"], "epochs": 9})
    cells = expand(suite, methods=["m"], seeds=[0])
    d = os.path.join(str(tmp_path), cells[0].rel_dir())
    assert cell_state(d, cells[0].spec()) == "stale"
    launcher = FakeLauncher()
    launcher.root = str(tmp_path)
    counts = run_cells(cells, str(tmp_path), launch=launcher, log=lambda s: None)
    assert (counts["stale"], counts["complete"], launcher.calls) == (2, 1, [])  # t2 sets its own epochs: unchanged
    counts = run_cells(cells, str(tmp_path), launch=launcher, rerun_stale=True, log=lambda s: None)
    assert launcher.calls[-1][1][-1] == "--overwrite" and counts["ran"] == 2


def test_only_tasks_restricts_a_row():
    data = {
        "name": "t",
        "seeds": [0, 1],
        "defaults": {"backbone": "timm:test_vit", "epochs": 1},
        "tasks": [{"name": "a", "data": "digits:1k"}, {"name": "b", "data": "digits"}],
        "methods": {"linear": {}, "last": {"only_tasks": ["b"]}},
    }
    cells = expand(parse_suite(data))
    assert sorted((c.task, c.label) for c in cells if c.seed == 0) == [("a", "linear"), ("b", "last"), ("b", "linear")]
    with pytest.raises(ConfigError, match="unknown task 'c'"):
        parse_suite({**data, "methods": {"last": {"only_tasks": ["c"]}}})
