"""The eager fast path of the simulated quantized forward (in-place fake quantization, cached weight dequantization,
shared q/k/v input quantization, in-place log2 quantizer) gives the reference ops' results bit for bit."""

import copy

import pytest
import torch

from _ptq_models import batches, ptq_bert, ptq_cnn, ptq_vit, tuned
from thrifty.compress import load_quantized, make_quant_config, quantize_, save_quantized
from thrifty.compress.quant import layers, quantizers, serialize
from thrifty.compress.quant.layers import QuantLinear
from thrifty.compress.quant.quantizers import ActQuantizer, Log2Quantizer, act_range, fake_quant, fake_quant_uint8


torch.set_num_threads(1)
BACKBONES = {"vit": ptq_vit, "bert": ptq_bert, "cnn": ptq_cnn}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values and signs of zero (NaNs compared as NaNs: their payload is not specified)."""
    nan = torch.isnan(a)
    if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(nan, torch.isnan(b)):
        return False
    a, b = a[~nan], b[~nan]
    return torch.equal(a, b) and torch.equal(torch.signbit(a), torch.signbit(b))


@pytest.fixture
def reference(monkeypatch):
    """Switch the fast path off: every call takes the custom ops, no cache, no sharing (what the exporter sees)."""

    def off():
        monkeypatch.setattr(quantizers, "eager", lambda x: False)
        monkeypatch.setattr(layers, "eager", lambda x: False)

    return off


def edge_values(scale: float, zp: int, n: int = 4000) -> torch.Tensor:
    g = torch.Generator().manual_seed(zp)
    grid = (torch.arange(-300, 300, dtype=torch.float32) - zp + 0.5) * scale  # exact halves between levels
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-30, -1e-30, scale * 0.4999])
    return torch.cat([torch.randn(n, generator=g) * 300 * scale, grid, special, -special])


@pytest.mark.parametrize("bits", [2, 4, 6, 8])
@pytest.mark.parametrize("scale,zp", [(0.037, 0), (0.11, 3), (0.0071, 128), (1e-8, 255), (0.25, 7)])
def test_fake_quant_equals_the_custom_op(bits, scale, zp):
    qmin, qmax = act_range(bits)
    zp = min(zp, qmax)
    s, z = torch.tensor(scale), torch.tensor(zp, dtype=torch.int32)
    lo, hi = (qmin - z) * s, (qmax - z) * s
    x = edge_values(scale, zp)
    assert same_bits(fake_quant(x, s, z, lo, hi, -1), fake_quant_uint8(x, s, z, lo, hi, -1))
    seg = torch.tensor([scale, scale * 3, scale / 7])  # per segment along axis 1 of (n, 3, c)
    zs = torch.tensor([zp, qmax // 2, 0], dtype=torch.int32)
    los, his = ((qmin - zs) * seg)[:, None], ((qmax - zs) * seg)[:, None]
    y = x[: 3 * 400].reshape(400, 3, 1).expand(400, 3, 2).contiguous()
    assert same_bits(fake_quant(y, seg, zs, los, his, 1), fake_quant_uint8(y, seg, zs, los, his, 1))


@pytest.mark.parametrize("bits", [3, 4, 6, 8])
@pytest.mark.parametrize("delta", [1.0, 0.37, 1e-3, 3e8])
def test_log2_in_place_equals_the_reference(bits, delta, reference):
    g = torch.Generator().manual_seed(bits)
    p = torch.softmax(torch.randn(4, 3, 16, 16, generator=g) * 12, -1)
    special = torch.tensor([0.0, 1e-45, 1e-40, 1e-30, 1e-20, 0.5, 1.0, 2.0, float("nan"), float("inf")])
    x = torch.cat([p.reshape(-1), special])
    q = Log2Quantizer()
    q.set_bits(bits)
    d = torch.tensor(delta)
    fast = q._log2_qdq(x, d)
    reference()
    assert same_bits(fast, q._log2_qdq(x, d))


def test_dequantized_weight_cache_follows_the_tensors():
    layer = QuantLinear(torch.nn.Linear(8, 4))
    layer.quantize_weight_(4)
    w = layer.weight_dequantized()
    assert layer.weight_dequantized() is w  # reused
    with torch.no_grad():
        layer.weight_scale.mul_(2)  # in place: version counter moves
    assert torch.equal(layer.weight_dequantized(), w * 2)
    layer.weight_scale = layer.weight_scale / 2  # a new tensor
    assert torch.equal(layer.weight_dequantized(), w)
    other = QuantLinear(torch.nn.Linear(8, 4, bias=False))
    other.quantize_weight_(4)
    assert not torch.equal(other.weight_dequantized(), w)
    other.load_state_dict(layer.state_dict())  # copy_ into the buffers
    assert torch.equal(other.weight_dequantized(), w)
    with torch.inference_mode():
        inf = QuantLinear(torch.nn.Linear(8, 4))
        inf.quantize_weight_(4)
        assert torch.equal(inf.weight_dequantized(), inf.weight_dequantized())  # no version counter: no cache


def test_shared_input_quantization_is_recomputed_when_x_or_the_parameters_change():
    a, b = ActQuantizer(), ActQuantizer()
    for q in (a, b):
        q.set_bits(8)
        q.set_qparams(torch.tensor([0.05]), torch.tensor([100.0]))
    x = torch.randn(2, 5, 8)
    ya = a(x)
    assert b(x) is ya  # same tensor, same parameters: shared
    b.set_qparams(torch.tensor([0.07]), torch.tensor([100.0]))
    yb = b(x)
    assert yb is not ya and not torch.equal(yb, ya)
    x.mul_(3)  # the input changed in place
    assert torch.equal(a(x), fake_quant_uint8(x, a.scale[0], a.zero_point[0], a.bounds[0, 0], a.bounds[1, 0], -1))


@pytest.mark.parametrize("kind", sorted(BACKBONES))
def test_quantized_models_equal_the_reference_path(kind, reference, tmp_path, monkeypatch):
    """Calibration (which runs the fast path too) gives the same tensors, and the forward the same logits, as the
    reference ops, in memory and after save / load."""
    torch.manual_seed(0)
    bb = BACKBONES[kind]()
    base, data = tuned(bb), batches(bb)
    configs = [(m, b) for m in ("ptq", "qwt", "qwt_v2") for b in ((4, 8), (8, 4), (6, 6))]

    def quantized(method, bits):
        m = copy.deepcopy(base)
        extra = {} if method == "ptq" else {"calib_samples": 24}
        quantize_(m, make_quant_config(method, bits, **extra), calib_data=data)
        return m

    models = {key: quantized(*key) for key in configs}
    monkeypatch.setattr(serialize, "load_backbone", lambda *a, **k: BACKBONES[kind]())  # tiny: not a spec
    with torch.no_grad():
        fast = {key: [m(x) for x in data] for key, m in models.items()}
        for (method, bits), m in models.items():
            save_quantized(m, str(tmp_path / f"{method}{bits}"))
        loaded = {k: [load_quantized(str(tmp_path / f"{k[0]}{k[1]}"))[0](x) for x in data] for k in models}
        reference()
        ref = {key: [m(x) for x in data] for key, m in models.items()}
        for key in configs:
            assert all(same_bits(a, b) for a, b in zip(fast[key], ref[key], strict=True)), key
            assert all(same_bits(a, b) for a, b in zip(loaded[key], ref[key], strict=True)), key
        for key in (("qwt", (6, 6)), ("qwt_v2", (4, 8))):
            want, got = quantized(*key).state_dict(), models[key].state_dict()
            assert want.keys() == got.keys() and all(same_bits(want[k], got[k]) for k in want), key
