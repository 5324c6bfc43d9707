"""`thrifty bench` end to end with real `thrifty train` processes: the smoke suite (tiny random ViT, 1 epoch),
a rerun that skips every complete cell, a real failing cell shown as failed, and `thrifty report --docs`.
Its fashion-mnist cells run when the Debian package is installed (always in CI); without it, digits alone."""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from conftest import has_asset
from thrifty.cli.main import main


def test_smoke_suite_end_to_end(tmp_path, capsys):
    out = str(tmp_path / "runs")
    tasks = ["digits", "fashion-mnist"] if has_asset("dataset-fashion-mnist") else ["digits"]
    smoke = ["bench", "--suite", "smoke", "--output", out, "--methods", "linear", "--tasks", ",".join(tasks)]
    assert main([*smoke, "--no-report"]) == 0
    assert {d.name for d in os.scandir(out) if d.is_dir()} == set(tasks)
    results = [os.path.join(out, t, "linear", "seed0", "results.json") for t in tasks]
    for path in results:
        r = json.loads(Path(path).read_text())
        assert r["status"] == "complete" and 0.0 <= r["metrics"]["test_accuracy"] <= 1.0
        assert r["metrics"]["test_samples"] == 200 and r["task"]["split_sizes"]["train800val200"] == 1000
        run = json.loads(Path(path).with_name("cell.json").read_text())["last_run"]
        assert run["returncode"] == 0 and run["cpu_seconds"] > 0
    stamps = [os.path.getmtime(p) for p in results]
    capsys.readouterr()

    # rerun: every cell is complete, nothing is launched, the report is built
    assert main(smoke) == 0
    text = capsys.readouterr().out
    assert text.count("complete, skipped") == len(tasks) and "running" not in text
    assert [os.path.getmtime(p) for p in results] == stamps
    assert "| linear |" in text and "mean of group means" in text

    # a grid whose cell cannot start: recorded, reported as failed, the exit code says so
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        yaml.safe_dump(
            {
                "name": "broken",
                "defaults": {"backbone": "timm:no_such_model_xyz", "random_init": True, "epochs": 1},
                "tasks": [{"name": "digits", "group": "g", "data": "digits:1k"}],
                "methods": {"linear": {}},
            }
        )
    )
    bad = str(tmp_path / "bad")
    assert main(["bench", "--grid", str(grid), "--output", bad]) == 1
    text = capsys.readouterr().out
    failed = json.loads(Path(bad, "digits", "linear", "seed0", "failed.json").read_text())
    assert failed["returncode"] != 0 and "no_such_model_xyz" in failed["stderr_tail"]
    assert "FAILED" in text and "| linear | failed |" in text

    # the docs page of the smoke run
    docs = tmp_path / "docs" / "benchmarks.md"
    assert main(["report", out, "--docs", str(docs)]) == 0
    page = docs.read_text()
    assert "Suite **smoke**" in page and "| linear |" in page and "final epoch" in page
    assert all(
        (docs.parent / "benchmarks" / f).is_file()
        for f in ("accuracy_vs_saved_bytes.png", "accuracy_vs_train_time.png")
    )
