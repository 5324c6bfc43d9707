import json
import os

import pytest
import yaml

from conftest import TINY_TRAIN
from thrifty.cli.main import main
from thrifty.io import read_json


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_info_reports_exact_lora_count(capsys):
    code, out, _ = run_cli(
        capsys,
        "info",
        "--backbone",
        "timm:vit_base_patch16_224",
        "--method",
        "lora",
        "--set",
        "r=8",
        "--num-classes",
        "100",
        "--json",
    )
    d = json.loads(out)
    assert code == 0
    assert d["adapter_params"] == 294_912 and d["head_params"] == 76_900
    assert d["trainable_params"] == 294_912 + 76_900
    # adapter_model.safetensors holds fp32 adapter + head weights plus a small header
    assert 4 * d["trainable_params"] < d["adapter_bytes"] < 4 * d["trainable_params"] + 8192


def test_config_file_and_set_overrides(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump({"backbone": "timm:vit_base_patch16_224", "method": "lora", "num-classes": 10, "set": {"r": 4}})
    )
    code, out, _ = run_cli(capsys, "info", "-c", str(cfg), "--set", "r=2", "--json")
    assert code == 0 and json.loads(out)["adapter_params"] == 12 * 2 * (768 + 2304)  # flag beats file
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochz: 3\n")
    code, _, err = run_cli(
        capsys, "info", "-c", str(bad), "--backbone", "timm:test_vit", "--method", "linear", "--num-classes", "2"
    )
    assert code == 2 and "unknown option 'epochz'" in err
    code, _, err = run_cli(
        capsys, "info", "--backbone", "timm:test_vit", "--method", "lora", "--set", "r", "--num-classes", "2"
    )
    assert code == 2 and "key=value" in err


def test_train_writes_results_then_eval_agrees(tmp_path, capsys):
    out = str(tmp_path / "run")
    code, _, err = run_cli(
        capsys, *TINY_TRAIN, "--method", "adaptformer", "--set", "bottleneck=4", "--epochs", "2", "--output", out
    )
    assert code == 0, err
    assert sorted(os.listdir(out)) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "config.yaml",
        "results.json",
    ]
    res = read_json(os.path.join(out, "results.json"))
    m = res["metrics"]
    for key in (
        "test_accuracy",
        "trainable_params",
        "adapter_bytes",
        "saved_activation_bytes",
        "peak_memory_bytes",
        "seconds_per_epoch",
        "samples_per_second",
    ):
        assert key in m, key
    assert m["test_accuracy"] > 0.3  # 10 classes: chance is 0.1
    assert m["adapter_bytes"] == os.path.getsize(os.path.join(out, "adapter_model.safetensors"))
    assert res["seed"] == 0 and res["env"]["versions"]["torch"] and res["task"]["protocol"] == "1k"
    with open(os.path.join(out, "config.yaml")) as fh:
        assert yaml.safe_load(fh)["method"] == "adaptformer"

    code, printed, err = run_cli(
        capsys,
        "eval",
        "--backbone",
        "timm:test_vit",
        "--random-init",
        "--image-size",
        "32",
        "--data",
        "digits:1k",
        "--test-size",
        "100",
        "--adapter",
        out,
        "--json",
    )
    assert code == 0, err
    assert json.loads(printed)["accuracy"] == pytest.approx(m["test_accuracy"])

    code, _, err = run_cli(capsys, *TINY_TRAIN, "--method", "adaptformer", "--epochs", "1", "--output", out)
    assert code == 2 and "--overwrite" in err  # finished results are never overwritten silently


def test_profile_orders_saved_bytes(tmp_path, capsys):
    path = str(tmp_path / "p.json")
    code, out, err = run_cli(
        capsys,
        "profile",
        "--backbone",
        "timm:test_vit",
        "--image-size",
        "32",
        "--methods",
        "linear,lora,full",
        "--batch-size",
        "4",
        "--steps",
        "1",
        "--output",
        path,
    )
    assert code == 0, err
    res = read_json(path)["methods"]
    assert res["linear"]["saved_activation_bytes"] < res["lora"]["saved_activation_bytes"]
    assert res["lora"]["saved_activation_bytes"] < res["full"]["saved_activation_bytes"]
    assert all(r["peak_memory_bytes"] >= 0 and r["step_seconds"] > 0 for r in res.values())
    assert "| linear |" in out


def test_help_for_every_command(capsys):
    from thrifty.cli.main import COMMANDS

    for name in COMMANDS:
        with pytest.raises(SystemExit) as exc:
            main([name, "--help"])
        assert exc.value.code == 0
        assert "usage: thrifty" in capsys.readouterr().out
