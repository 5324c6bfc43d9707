"""Quantizer properties (hypothesis): codes in range, values on the grid, idempotence, error bounds."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from thrifty.compress.calibration import check_step
from thrifty.compress.quant.config import PTQConfig, make_quant_config, parse_bits
from thrifty.compress.quant.quantizers import ActQuantizer, Log2Quantizer
from thrifty.compress.quant.serialize import _pack_nibbles, _unpack_nibbles
from thrifty.compress.quant.weights import search_weight, weight_range
from thrifty.errors import ConfigError


bits_st = st.integers(2, 8)
seed_st = st.integers(0, 2**16)


def _act(values: torch.Tensor, bits: int, segments: int = 1) -> ActQuantizer:
    q = ActQuantizer(segments, observer_samples=4096)
    q.mode = "observe"
    q(values)
    q.calibrate(bits)
    return q


@settings(max_examples=25, deadline=None)
@given(bits=bits_st, seed=seed_st, symmetric=st.booleans(), scale=st.floats(1e-3, 1e3))
def test_weight_codes_in_range_and_error_bounded(bits, seed, symmetric, scale):
    w = torch.randn(6, 20, generator=torch.Generator().manual_seed(seed)) * scale
    codes, s, z = search_weight(w, bits, symmetric)
    qmin, qmax = weight_range(bits, symmetric)
    assert codes.dtype == (torch.int8 if symmetric else torch.uint8)
    assert int(codes.min()) >= qmin and int(codes.max()) <= qmax
    if symmetric:
        assert torch.all(z == 0)
    w_hat = (codes.float() - z.float()[:, None]) * s[:, None]
    lo, hi = (qmin - z.float()) * s, (qmax - z.float()) * s  # representable range per channel
    inside = (w >= lo[:, None]) & (w <= hi[:, None])
    assert torch.all((w - w_hat).abs()[inside] <= (s[:, None] / 2 * (1 + 1e-4)).expand_as(w)[inside])
    again, _, _ = search_weight(w_hat, bits, symmetric)  # re-quantizing the grid values is exact
    torch.testing.assert_close((again.float() - z.float()[:, None]) * s[:, None], w_hat, rtol=1e-4, atol=1e-6 * scale)


@settings(max_examples=25, deadline=None)
@given(bits=bits_st, seed=seed_st, shift=st.floats(-5, 5), segments=st.sampled_from([1, 3]))
def test_activation_values_on_grid_and_idempotent(bits, seed, shift, segments):
    x = torch.randn(4, 7, 6 * segments, generator=torch.Generator().manual_seed(seed)) + shift
    q = _act(x, bits, segments)
    y = q(x)
    assert y.shape == x.shape
    ys = y.reshape(-1, segments, 6).transpose(0, 1).reshape(segments, -1)
    for k in range(segments):
        codes = ys[k] / q.scale[k] + q.zero_point[k]
        assert torch.allclose(codes, codes.round(), atol=1e-3)
        assert int(codes.round().min()) >= 0 and int(codes.round().max()) <= 2**bits - 1
        assert codes.round().unique().numel() <= 2**bits
    torch.testing.assert_close(q(y), y, rtol=1e-5, atol=1e-6)


@settings(max_examples=20, deadline=None)
@given(bits=bits_st, seed=seed_st)
def test_log2_quantizer_levels(bits, seed):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(2, 3, 8, 8, generator=g) * 3, -1)
    q = Log2Quantizer(1, observer_samples=4096)
    q.mode = "observe"
    q(p)
    q.calibrate(bits)
    y = q(p)
    delta = float(q.scale[0])
    nz = y[y > 0]
    k = -torch.log2(nz / delta)
    assert torch.allclose(k, k.round(), atol=1e-4)
    assert int(k.round().min()) >= 0 and int(k.round().max()) <= 2**bits - 1
    order = torch.argsort(p.reshape(-1))
    assert torch.all(torch.diff(y.reshape(-1)[order]) >= 0)  # monotone
    torch.testing.assert_close(q(y), y)


@settings(max_examples=20, deadline=None)
@given(seed=seed_st, signed=st.booleans(), n=st.integers(1, 33))
def test_nibble_packing_round_trip(seed, signed, n):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-7 if signed else 0, 8 if signed else 16, (n, 3), generator=g)
    codes = codes.to(torch.int8 if signed else torch.uint8)
    packed = _pack_nibbles(codes, signed)
    assert packed.numel() == (codes.numel() + 1) // 2
    torch.testing.assert_close(_unpack_nibbles(packed, codes, signed), codes)


def test_config_validation():
    assert check_step("convert") == "convert"
    try:
        PTQConfig(step="observe")
    except ConfigError as exc:
        assert "is not one of" in str(exc)
    else:
        raise AssertionError("step='observe' must be refused")
    assert parse_bits("W4A8") == (4, 8)
    for bad in ("w5a8", "4/8", "w4"):
        try:
            parse_bits(bad)
        except ConfigError:
            continue
        raise AssertionError(f"{bad} must be refused")
    cfg = make_quant_config("qwt", "w6a6", ridge=0.1, edge_bits=None)
    assert cfg.base_config.w_bits == 6 and cfg.base_config.edge_bits is None and cfg.ridge == 0.1
    try:
        make_quant_config("qwt_v2", "w4a4", fold=True, pack=False)
    except ConfigError:
        pass
    else:
        raise AssertionError("folding without packing must be refused")


def test_cli_options_are_typed_and_checked():
    from thrifty.cli.quantize import quant_options

    opts = quant_options("qwt", {"ridge": "0.01", "cache_hidden": "false", "edge_bits": "none", "percentiles": "0.99"})
    assert opts == {"ridge": 0.01, "cache_hidden": False, "edge_bits": None, "percentiles": [0.99]}
    cfg = make_quant_config("qwt", "w4a8", **opts)
    assert cfg.base_config.percentiles == (0.99,) and cfg.base_config.edge_bits is None
    for bad in ({"nope": "1"}, {"w_bits": "4"}, {"ridge": "x"}):
        try:
            quant_options("qwt", bad)
        except ConfigError:
            continue
        raise AssertionError(f"{bad} must be refused")
