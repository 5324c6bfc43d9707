"""Feature server on loopback: authentication, limits, malformed input, features = local gather, cache
verification against /info, concurrent clients. One server (a child process) for the whole file."""

import base64
import io
import json

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from serve_util import server_args, write_checkpoint, write_token
from thrifty.backbones import load_backbone
from thrifty.backbones.base import file_sha256
from thrifty.backbones.remote.protocol import GATHER, RemoteError, decode_features
from thrifty.cli.main import main
from thrifty.data import load_data
from thrifty.errors import ConfigError
from thrifty.features import CacheMismatchError, extract_features, extract_taps
from thrifty.features.remote import RemoteFeatures, encoded_image
from thrifty.serve.loadtest import png_images, run_load
from thrifty.serve.process import ServerProcess
from thrifty.train import TrainConfig, run_training


torch.set_num_threads(1)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    ck, tok = write_checkpoint(root / "ck.safetensors"), write_token(root / "token")
    args = server_args(ck, tok, "--max-batch", "8", "--max-body-mb", "0.25", "--max-image-pixels", "4096")
    with ServerProcess(args) as server:
        yield {"url": server.url, "ck": ck, "tok": tok, "token": (root / "token").read_text().strip()}


def auth(served):
    return {"Authorization": f"Bearer {served['token']}"}


def post(served, body, headers=None, content_type="application/json"):
    h = {**auth(served), "Content-Type": content_type, **(headers or {})}
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(served["url"] + GATHER, content=data, headers=h, timeout=60)


def b64(data):
    return base64.b64encode(data).decode()


def image_bytes(size=8, fmt="PNG"):
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), 7, np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def test_health_info_and_authentication(served):
    url = served["url"]
    assert httpx.get(url + "/health").json() == {"status": "ok"}  # the only open endpoint
    for headers in ({}, {"Authorization": "Bearer wrong-token-wrong-token"}, {"Authorization": served["token"]}):
        r = httpx.get(url + "/info", headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer" and "token" in r.json()["detail"]
        r = post(served, {"images": [b64(image_bytes())]}, headers=headers or {"Authorization": ""})
        assert r.status_code == 401 and r.headers["content-type"] == "application/json"  # no features
        assert set(r.json()) == {"detail"}
    for path in ("/docs", "/openapi.json"):
        assert httpx.get(url + path).status_code == 404  # nothing else is exposed
    info = httpx.get(url + "/info", headers=auth(served)).json()
    assert info["tap"] == "gather.6" and info["k"] == 6 and info["first"] == 0 and info["gather"] == "sum"
    assert info["backbone"]["checkpoint_hash"] == file_sha256(served["ck"], limit_mb=64)
    assert info["backbone"]["tokens"] == 5 and info["backbone"]["num_features"] == 64  # 1 CLS + (32 / 16)^2
    assert info["dtype"] == "float16" and info["bytes_per_sample"] == 5 * 64 * 2
    assert info["preprocess"]["size"] == [32, 32] and info["limits"]["max_batch"] == 8


def test_malformed_or_oversize_requests_get_4xx(served):
    png = image_bytes()
    cases = [
        (b"{", "application/json", 400, "not valid JSON"),
        (json.dumps({"images": [b64(png)]}).encode(), "text/plain", 415, "application/json"),
        ([1, 2], None, 422, "JSON object"),
        ({"images": "abc"}, None, 422, "non-empty list"),
        ({"images": []}, None, 422, "non-empty list"),
        ({"images": ["!!!"]}, None, 422, "base64"),
        ({"images": [7]}, None, 422, "base64 string"),
        ({"images": [b64(b"not an image")]}, None, 422, "could not be decoded"),
        ({"images": [b64(image_bytes(64)[:80])]}, None, 422, "could not be decoded"),  # truncated PNG
        ({"images": [b64(image_bytes(fmt="GIF"))]}, None, 415, "PNG or JPEG"),
        ({"images": [b64(image_bytes(100))]}, None, 413, "pixels"),  # 10,000 > 4,096 pixels
        ({"images": [b64(png)] * 9}, None, 413, "limit is 8"),
        ({"input_ids": [[101, 102]]}, None, 422, "send `images`"),
        ({"images": [b64(png)], "labels": [1]}, None, 422, "unknown fields"),
        ({"images": [b64(png)], "dtype": "int8"}, None, 422, "dtype"),
        (b"x" * 300_000, "application/json", 413, "limit"),  # declared Content-Length over 0.25 MiB
    ]
    for body, ctype, status, detail in cases:
        r = post(served, body, content_type=ctype or "application/json")
        assert r.status_code == status, (body if len(str(body)) < 200 else "big", r.text)
        assert detail in r.json()["detail"]

    def streamed():  # chunked upload without Content-Length: cut off once over the limit
        for _ in range(40):
            yield b"x" * 10_000

    h = {**auth(served), "Content-Type": "application/json"}
    r = httpx.post(served["url"] + GATHER, content=streamed(), headers=h, timeout=60)
    assert r.status_code == 413
    # never a crash: the server still answers, and a good request still works
    r = post(served, {"images": [b64(png), b64(image_bytes(fmt="JPEG"))]})
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    feats, meta = decode_features(r.content, samples=2, dim=64, max_tokens=5, dtype="float16")
    assert feats.shape == (2, 5, 64) and meta["tap"] == "gather.6"
    assert httpx.get(served["url"] + "/info", headers=auth(served)).json()["stats"]["errors"] == 0


def test_served_features_equal_the_local_gather(served):
    link = RemoteFeatures.connect(served["url"], served["tok"], backbone="timm:test_vit")
    bb = load_backbone("timm:test_vit", checkpoint=served["ck"], image_size=32)
    task = load_data("digits:1k", bb.preprocess, seed=0, test_size=20)
    ds = task.splits["test"]
    images = [encoded_image(ds, i) for i in range(len(ds))]
    kw = {"dim": 64, "max_tokens": 5}
    f32, _ = link.client.gather(images=images[:8], dtype="float32", **kw)
    f16, _ = link.client.gather(images=images[:8], dtype="float16", **kw)
    want = extract_taps(bb, torch.stack([ds[i][0] for i in range(8)]), ["gather.6"])["gather.6"]
    torch.testing.assert_close(f32, want, rtol=1e-5, atol=1e-5)  # PNG is lossless: same pixels, same gather
    assert f16.dtype == torch.float16 and torch.equal(f16, f32.half())
    link = RemoteFeatures.connect(served["url"], served["tok"])
    rows = list(link.batches(ds, 0, len(ds)))  # the cache's batch source: 8 samples per request (server limit)
    assert [len(r["gather.6"]) for r in rows] == [8, 8, 4]
    assert link.client.stats["samples"] == 20 and link.client.stats["retries"] == 0
    per_sample = link.metrics()["remote_bytes_per_sample"]
    assert 640 < per_sample < 640 + 200 / 4  # 5 x 64 float16 values + one small safetensors header per request


def remote_run(served, tmp_path, name, cache=None, **kw):
    args = dict(backbone="timm:test_vit", data="digits:1k", method="miet", test_size=100, peak_memory=False)
    args.update(train=TrainConfig(epochs=1, batch_size=50, progress=False), overrides=kw.pop("overrides", {}))
    args.update(kw)
    return run_training(
        remote=served["url"], token_file=served["tok"], cache=cache, output_dir=str(tmp_path / name), **args
    )


def test_cache_is_verified_against_info(served, tmp_path):
    bb = load_backbone("timm:test_vit", checkpoint=served["ck"], image_size=32)
    task = load_data("digits:1k", bb.preprocess, seed=0, test_size=100)
    local = str(tmp_path / "local")
    extract_features(local, bb, task, ["gather.6"], splits=["train800val200", "test"], dtype="float16")
    argv = ["train", "--backbone", "timm:test_vit", "--data", "digits:1k", "--test-size", "100", "--method", "miet"]
    argv += ["--remote", served["url"], "--token-file", served["tok"], "--cache", local, "--epochs", "1"]
    assert main([*argv, "--no-progress", "--no-peak-memory", "--output", str(tmp_path / "a")]) == 0
    res = json.loads((tmp_path / "a" / "results.json").read_text())  # same backbone, weights, k, dtype: accepted
    assert res["metrics"]["remote_bytes_received"] == 0 and res["task"]["feature_cache"]["taps"] == ["gather.6"]
    assert res["backbone"]["checkpoint_hash"] == bb.checkpoint_hash and res["method"]["config"]["k"] == 6
    other_k = str(tmp_path / "k3")
    extract_features(other_k, bb, task, ["gather.3"], splits=["test"], dtype="float16")
    with pytest.raises(CacheMismatchError, match=r"method reads \['gather.6'\]"):
        remote_run(served, tmp_path, "b", cache=other_k)
    other = load_backbone("timm:test_vit", checkpoint=write_checkpoint(tmp_path / "ck1.safetensors", 1), image_size=32)
    other_bb = str(tmp_path / "other")
    extract_features(other_bb, other, task, ["gather.6"], splits=["test"], dtype="float16")
    with pytest.raises(CacheMismatchError, match="another backbone or weights"):
        remote_run(served, tmp_path, "c", cache=other_bb)
    fp32 = str(tmp_path / "fp32")
    extract_features(fp32, bb, task, ["gather.6"], splits=["test"])
    with pytest.raises(CacheMismatchError, match="stores float32"):
        remote_run(served, tmp_path, "d", cache=fp32)
    with pytest.raises(ConfigError, match=r"serves gather\.6"):
        remote_run(served, tmp_path, "e", overrides={"k": "3"})
    with pytest.raises(ConfigError, match=r"serves timm:test_vit"):
        remote_run(served, tmp_path, "f", backbone="timm:vit_tiny_patch16_224")
    bad = tmp_path / "bad-token"
    bad.write_text("x" * 32)
    with pytest.raises(RemoteError, match="401"):
        run_training(
            backbone="timm:test_vit", data="digits:1k", method="miet", remote=served["url"], token_file=str(bad)
        )


def test_concurrent_clients(served):
    res = run_load(served["url"], served["token"], clients=4, requests=10, samples=2, image_size=32)
    print(f"\n4 clients x 10 requests: p50 {res['p50_ms']:.1f} ms, p99 {res['p99_ms']:.1f} ms, {res['server_stats']}")
    assert res["errors"] == 0 and res["ok"] == 40, res["first_errors"]
    assert len(png_images(2, 8)) == 2
