"""Sweeps: many side networks on one backbone pass equal their separate runs; selection on val only."""

import json
import os
from dataclasses import replace

import pytest
import torch

from thrifty.backbones import BackboneSpec
from thrifty.cli.main import main
from thrifty.errors import ConfigError
from thrifty.io import load_tensors
from thrifty.train import TrainConfig, run_training
from thrifty.train.members import grid, member_dir, parse_sweep


torch.set_num_threads(1)
DATA = dict(backbone=BackboneSpec("timm:test_vit", random_init=True, image_size=32), data="digits:1k", test_size=50)
TRAIN = TrainConfig(epochs=2, batch_size=100, progress=False, select_on_val=True)


def test_parse_and_grid():
    sweep = parse_sweep(["lr=1e-3,3e-3", "r=8, 16"])
    assert sweep == {"lr": ["1e-3", "3e-3"], "r": ["8", "16"]}
    assert grid(sweep)[1] == {"lr": "1e-3", "r": "16"} and len(grid(sweep)) == 4
    assert member_dir({"lr": "1e-3", "r": "8"}) == "lr-1e-3_r-8"
    for bad, match in (("epochs=1,2", "cannot vary"), ("lr", "KEY=V1"), ("lr=", "KEY=V1")):
        with pytest.raises(ConfigError, match=match):
            parse_sweep([bad])


def test_sweep_equals_separate_runs(tmp_path):
    torch.manual_seed(0)  # the random-init backbone
    summary = run_training(
        method="last",
        sweep={"lr": ["1e-3", "3e-1"], "r": ["4", "8"]},
        overrides={"taps": "2,5"},
        train=TRAIN,
        output_dir=str(tmp_path),
        **DATA,
    )
    rows = {r["name"]: r for r in summary["members"]}
    assert len(rows) == 4 and all(r["status"] == "complete" for r in rows.values())
    best = max(rows.values(), key=lambda r: r["val_accuracy"])
    assert summary["selected"] == best["name"]
    assert json.loads((tmp_path / "sweep.json").read_text())["selected"] == best["name"]
    for lr, r in (("1e-3", "4"), ("3e-1", "8")):
        torch.manual_seed(0)
        sep = run_training(
            method="last",
            overrides={"r": r, "taps": "2,5"},
            train=replace(TRAIN, lr=float(lr)),
            output_dir=str(tmp_path / "separate"),
            overwrite=True,
            peak_memory=False,
            **DATA,
        )
        member = json.loads((tmp_path / f"lr-{lr}_r-{r}" / "results.json").read_text())
        assert [h["train_loss"] for h in member["history"]] == [h["train_loss"] for h in sep["history"]]
        for key in ("test_accuracy", "val_accuracy", "selected_epoch", "saved_activation_bytes", "trainable_params"):
            assert member["metrics"][key] == sep["metrics"][key], key
        a = load_tensors(str(tmp_path / f"lr-{lr}_r-{r}" / "adapter_model.safetensors"))
        b = load_tensors(str(tmp_path / "separate" / "adapter_model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in b)
        assert member["method"]["config"]["r"] == int(r) and member["train"]["lr"] == float(lr)


def test_sweep_on_cache_equals_sweep_on_images(tmp_path):
    out = {}
    for name, cache in (("images", None), ("cache", str(tmp_path / "cache"))):
        torch.manual_seed(0)
        train = replace(TRAIN, select_on_val=False)
        out[name] = run_training(method="linear", sweep={"lr": ["1e-3", "1e-1"]}, train=train, cache=cache, **DATA)
    assert out["images"]["members"] == out["cache"]["members"]
    assert out["images"]["selected"] is None  # no val split in use: nothing is selected (never on test)


def test_only_side_methods_sweep():
    with pytest.raises(ConfigError, match="share a backbone pass"):
        run_training(method="dtl", sweep={"lr": ["1e-3", "1e-2"]}, train=TRAIN, **DATA)
    with pytest.raises(ConfigError, match="not a training option"):
        run_training(method="last", sweep={"rank_of_nothing": ["1"]}, train=TRAIN, **DATA)


def test_cli_sweep(tmp_path, capsys):
    args = ["train", "--backbone", "timm:test_vit", "--random-init", "--image-size", "32", "--data", "digits:1k"]
    args += ["--test-size", "50", "--method", "last", "--set", "taps=-1", "--epochs", "1", "--no-progress"]
    args += ["--select-on-val", "--sweep", "lr=1e-3,1e-2", "--sweep", "r=4,8", "--output", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "selection: best val accuracy" in out and out.count("complete") == 4
    assert sorted(d for d in os.listdir(tmp_path) if d.startswith("lr-")) == [
        "lr-1e-2_r-4",
        "lr-1e-2_r-8",
        "lr-1e-3_r-4",
        "lr-1e-3_r-8",
    ]
    assert os.path.isfile(tmp_path / "summary.md") and os.path.isfile(tmp_path / "lr-1e-2_r-8" / "results.json")


def test_best_state_is_a_copy():
    """select_on_val keeps the best epoch's weights: the kept state must not alias the live parameters."""
    from thrifty.backbones import load_backbone
    from thrifty.data import load_data
    from thrifty.train import Trainer
    from thrifty.tuners import get_tuned_model, make_config

    bb = load_backbone("timm:test_vit", pretrained=False, image_size=32)
    task = load_data("digits:1k", bb.preprocess, test_size=50)
    trainer = Trainer(get_tuned_model(bb, make_config("linear"), task.num_classes), task, TRAIN)
    kept = trainer.members[0].state_copy()
    with torch.no_grad():
        trainer.model.head.weight.add_(1.0)
    assert not torch.equal(kept["head.weight"], trainer.model.head.weight)
