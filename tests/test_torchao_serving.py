"""PyTorch serving path (issue 21, item 3): thrifty's quantized tiny BERT on torchao's Int8Tensor and torch's CPU
int4 kernel, against thrifty's own simulation."""

import copy

import pytest
import torch
from torch import nn

from _ptq_models import stacked_logits, tuned_bert
from thrifty.compress import PTQConfig, QwTConfig, QwTV2Config, quantize_
from thrifty.compress.quant import QuantLinear
from thrifty.compress.quant.torchao_serving import (
    Int4Linear,
    ServingLinear,
    TorchaoServingConfig,
    quantize_float_linears_,
    serving_bytes,
    to_torchao_,
)
from thrifty.errors import ConfigError


pytest.importorskip("torchao")


FLOAT_ATTN = {"qkv_quant": False, "softmax_quant": False}  # the serving path runs attention in float


@pytest.fixture(scope="module")
def bert():
    return tuned_bert()


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _quantized(model, data, cfg):
    q = copy.deepcopy(model)
    quantize_(q, cfg, calib_data=data)
    return q


def _weight_only(q):
    """The simulation with thrifty's activation quantizers off: exactly the weights the int4 path multiplies by."""
    w = copy.deepcopy(q)
    for m in w.modules():
        if isinstance(m, QuantLinear):
            m.input_quantizer.mode = "off"
    return w


@pytest.mark.parametrize("method", ["ptq", "qwt_v2"])
def test_int8_static_equals_the_simulation(bert, method):
    model, data = bert
    base = PTQConfig(w_bits=8, a_bits=8, **FLOAT_ATTN)
    cfg = base if method == "ptq" else QwTV2Config(base_config=base)
    q = _quantized(model, data, cfg)
    ref = stacked_logits(q, data)
    served = copy.deepcopy(q)
    counts = to_torchao_(served, TorchaoServingConfig(mode="int8_static"))
    assert counts["linear"] == sum(isinstance(m, QuantLinear) for m in q.modules())
    assert not any(isinstance(m, QuantLinear) for m in served.modules())
    out = stacked_logits(served, data)
    # same integer weights, same activation grid: only float summation order (and rare round-half ties) differ
    assert _rel(out, ref) < 1e-4
    assert torch.equal(out.argmax(-1), ref.argmax(-1))


def test_int8_dynamic_is_torchao_int8_and_close(bert):
    model, data = bert
    q = _quantized(model, data, QwTV2Config(base_config=PTQConfig(w_bits=8, a_bits=8, **FLOAT_ATTN)))
    served = copy.deepcopy(q)
    to_torchao_(served, TorchaoServingConfig(mode="int8_dynamic"))
    lin = next(m for m in served.modules() if isinstance(m, ServingLinear))
    assert type(lin.weight).__name__ == "Int8Tensor" and lin.weight.qdata.dtype == torch.int8
    # per-token dynamic activations vs thrifty's static per-tensor ones: close, not equal
    assert _rel(stacked_logits(served, data), stacked_logits(_weight_only(q), data)) < 0.03


def test_qwt_branch_is_kept(bert):
    model, data = bert
    q = _quantized(model, data, QwTConfig(base_config=PTQConfig(w_bits=8, a_bits=8, **FLOAT_ATTN)))
    ref = stacked_logits(q, data)
    served = copy.deepcopy(q)
    to_torchao_(served, TorchaoServingConfig(mode="int8_static"))
    assert _rel(stacked_logits(served, data), ref) < 1e-4


def test_int4_weight_only_folds_cwac_into_groups_exactly(bert):
    model, data = bert
    base = PTQConfig(w_bits=4, a_bits=8, **FLOAT_ATTN)
    q = _quantized(model, data, QwTV2Config(base_config=base, fold=False))  # CWAC still attached
    layers = {n: m for n, m in q.named_modules() if isinstance(m, QuantLinear)}
    assert any(m.cwac_a is not None for m in layers.values())
    expected = {}
    for n, m in layers.items():
        if m.w_bits > 4:  # the 8-bit edge layers go to torchao int8
            continue
        a = m.cwac_a if m.cwac_a is not None else torch.ones_like(m.weight_scale)
        expected[n] = m.weight_codes.float() * (m.weight_scale * a)[:, None]
    served = copy.deepcopy(q)
    to_torchao_(served, TorchaoServingConfig(mode="int4_weight_only", group_size=32))
    for n, w in expected.items():
        got = served.get_submodule(n)
        assert isinstance(got, Int4Linear)
        torch.testing.assert_close(got.dequantized(), w, rtol=1e-5, atol=1e-7)  # packing round trip + fold
    folded = _quantized(model, data, QwTV2Config(base_config=base))
    out, ref = stacked_logits(served, data), stacked_logits(_weight_only(folded), data)
    assert _rel(out, ref) < 0.02  # bfloat16 activations


def test_state_dict_bytes_shrink(bert):
    model, data = bert
    q8 = _quantized(model, data, PTQConfig(w_bits=8, a_bits=8, **FLOAT_ATTN))
    q4 = _quantized(model, data, PTQConfig(w_bits=4, a_bits=8, **FLOAT_ATTN))
    to_torchao_(q8, TorchaoServingConfig(mode="int8_dynamic", embeddings=True))
    to_torchao_(q4, TorchaoServingConfig(mode="int4_weight_only", group_size=32, embeddings=True))

    def linear_bytes(m, kinds):
        return sum(serving_bytes(x) for x in m.modules() if isinstance(x, kinds))

    float_b = linear_bytes(model, nn.Linear)
    b8 = linear_bytes(q8, ServingLinear)
    weights = sum(x.weight.numel() for x in model.modules() if isinstance(x, nn.Linear))
    assert b8 < 0.3 * float_b
    for x in q8.modules():  # int8 codes + float32 per-channel scale + float32 bias, nothing else
        if isinstance(x, ServingLinear):
            assert serving_bytes(x) == x.out_features * x.in_features + 8 * x.out_features
    for x in q4.modules():  # two codes per byte + (scale, zero) per group and channel + bias
        if isinstance(x, Int4Linear):
            groups = x.in_features // x.group_size
            assert serving_bytes(x) == x.out_features * (x.in_features // 2 + 8 * groups + 4)
    emb = sum(x.weight.numel() for x in model.modules() if isinstance(x, nn.Embedding))
    assert serving_bytes(q8) < serving_bytes(model) - 2.5 * (emb + weights)
    torch.testing.assert_close(stacked_logits(q8, data), stacked_logits(q8, data))


def test_float_model_rtn_paths(bert):
    model, data = bert
    ref = stacked_logits(model, data)
    for mode, tol in (("int8_dynamic", 0.03), ("int4_weight_only", 0.2)):
        m = copy.deepcopy(model)
        n = quantize_float_linears_(m, TorchaoServingConfig(mode=mode, group_size=32))["linear"]
        assert n == sum(type(x) is nn.Linear for x in model.modules())
        assert _rel(stacked_logits(m, data), ref) < tol
    lin = nn.Linear(64, 16)
    m = nn.Sequential(lin)
    quantize_float_linears_(m, TorchaoServingConfig(mode="int4_weight_only", group_size=32))
    w, got = lin.weight.detach(), m[0].dequantized()
    step = (w.view(16, 2, 32).amax(-1) - w.view(16, 2, 32).amin(-1)) / 15
    assert bool(((got - w).abs().view(16, 2, 32) <= step[..., None] / 2 + 1e-2 * step[..., None]).all())


def test_bad_inputs_raise(bert):
    model, data = bert
    with pytest.raises(ConfigError, match="quantized model"):
        to_torchao_(copy.deepcopy(model))
    q = _quantized(model, data, PTQConfig(w_bits=8, a_bits=4, **FLOAT_ATTN))
    with pytest.raises(ConfigError, match="4 bits"):
        to_torchao_(copy.deepcopy(q), TorchaoServingConfig(mode="int4_weight_only", group_size=32))
    with pytest.raises(ConfigError, match="a_bits=4"):
        to_torchao_(copy.deepcopy(q), TorchaoServingConfig(mode="int8_static"))
    with pytest.raises(ConfigError, match="mode"):
        TorchaoServingConfig(mode="int3")


def test_int8_dynamic_torch_keeps_thrifty_codes(bert):
    model, data = bert
    q = _quantized(model, data, QwTV2Config(base_config=PTQConfig(w_bits=8, a_bits=8, **FLOAT_ATTN), fold=False))
    layers = {n: m for n, m in q.named_modules() if isinstance(m, QuantLinear)}
    served = copy.deepcopy(q)
    to_torchao_(served, TorchaoServingConfig(mode="int8_dynamic_torch"))
    for n, m in layers.items():
        got = served.get_submodule(n).weight()  # the qint8 per-channel weight fbgemm multiplies by
        assert torch.equal(got.int_repr(), m.weight_codes)
        torch.testing.assert_close(got.q_per_channel_scales().float(), m.weight_scale * m.cwac_a)  # CWAC folded
    assert _rel(stacked_logits(served, data), stacked_logits(_weight_only(q), data)) < 0.03
    linear = sum(x.weight.numel() for x in model.modules() if isinstance(x, nn.Linear))
    assert serving_bytes(served) < serving_bytes(model) - 2.5 * linear
