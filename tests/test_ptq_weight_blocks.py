"""Block-wise weight scales for <= 4-bit Linear weights (`PTQConfig.weight_block_size`): the search per block, the
simulation against onnxruntime's MatMulNBits, QwT-v2's channel affine folded into block scales, save / load."""

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from _ptq_models import ptq_bert, quantized_tiny
from thrifty.backbones import BackboneSpec
from thrifty.compress import PTQConfig, QwTV2Config, load_quantized, make_quant_config, save_quantized
from thrifty.compress.quant.layers import QuantLinear
from thrifty.compress.quant.onnx_export import export_onnx, ort_feed
from thrifty.compress.quant.weights import search_weight, search_weight_blocks
from thrifty.errors import ConfigError


def _block_layers(model):
    return [m for m in model.modules() if isinstance(m, QuantLinear) and m.weight_block_size]


@pytest.mark.parametrize("symmetric", [True, False])
def test_block_search_is_the_row_search_on_every_block(symmetric):
    torch.manual_seed(0)
    n, k, b = 5, 64, 16
    w = torch.randn(n, k) * torch.logspace(-2, 0, k)  # blocks of very different ranges along a row
    codes, scale, zp = search_weight_blocks(w, 4, b, symmetric, half_scales=True)
    assert codes.shape == (n, k) and scale.shape == (n, k // b) and zp.shape == (n, k // b)
    assert torch.equal(scale.half().float(), scale)  # half_params: float16 values
    for i in range(n):
        for j in range(k // b):
            c, s, z = search_weight(w[i : i + 1, j * b : (j + 1) * b], 4, symmetric, half_scales=True)
            assert torch.equal(c[0], codes[i, j * b : (j + 1) * b]) and s[0] == scale[i, j] and z[0] == zp[i, j]
    lo, hi = (-7, 7) if symmetric else (0, 15)
    assert int(codes.min()) >= lo and int(codes.max()) <= hi
    w_hat = ((codes.float().reshape(n, -1, b) - zp.float()[..., None]) * scale[..., None]).reshape(n, k)
    c, s, z = search_weight(w, 4, symmetric, half_scales=True)
    per_channel = (c.float() - z.float()[:, None]) * s[:, None]
    assert float((w_hat - w).norm()) < 0.7 * float((per_channel - w).norm())  # blocks fit the ranges better


def test_config_and_layer_checks():
    for bad in (48, 8, 0):
        with pytest.raises(ConfigError, match="weight_block_size"):
            PTQConfig(w_bits=4, a_bits=16, weight_block_size=bad)
    with pytest.raises(ConfigError, match="<= 4-bit"):
        PTQConfig(w_bits=8, a_bits=8, weight_block_size=128)
    assert PTQConfig(w_bits=4, a_bits=16).weight_block_size is None
    with pytest.raises(ConfigError, match="in_features=32"):  # the tiny BERT's hidden size is 32
        quantized_tiny(ptq_bert, PTQConfig(w_bits=4, a_bits=16, weight_block_size=64))
    from thrifty.cli.quantize import quant_options

    assert quant_options("ptq", {"weight_block_size": "128"}) == {"weight_block_size": 128}
    cfg = make_quant_config("qwt_v2", "w4a16", **quant_options("qwt_v2", {"weight_block_size": "16"}))
    assert cfg.base_config.weight_block_size == 16


@pytest.mark.parametrize(("a_bits", "symmetric"), [(16, True), (8, True), (16, False)])
def test_block_scales_match_onnxruntime_matmul_nbits_per_sample(a_bits, symmetric, tmp_path):
    cfg = PTQConfig(w_bits=4, a_bits=a_bits, weight_symmetric=symmetric, weight_block_size=16, embedding_bits=None)
    model, data = quantized_tiny(ptq_bert, cfg)
    layers = _block_layers(model)
    assert layers and all(m.weight_scale.shape == (m.out_features, m.in_features // 16) for m in layers)
    assert all(m.weight_zero_point.shape == m.weight_scale.shape for m in layers)
    assert all(not m.weight_block_size for m in model.modules() if isinstance(m, QuantLinear) and m.w_bits == 8)
    path = export_onnx(model, str(tmp_path / "model.onnx"), data[0])
    nodes = [n for n in onnx.load(path).graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == len(layers)
    assert all(next(a.i for a in n.attribute if a.name == "block_size") == 16 for n in nodes)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for x in data:
        with torch.no_grad():
            ref = model(x)
        out = torch.from_numpy(sess.run(["logits"], ort_feed(x))[0])
        err = (out - ref).abs().amax(-1) / ref.abs().amax(-1).clamp_min(1e-6)
        assert float(err.max()) < 1e-4, err  # per sample: float summation order only
        assert torch.equal(out.argmax(-1), ref.argmax(-1))


def test_qwt_v2_affine_folds_into_block_scales():
    base = PTQConfig(w_bits=4, a_bits=16, embedding_bits=None, weight_block_size=16)
    unfolded, data = quantized_tiny(ptq_bert, QwTV2Config(base_config=base, fold=False))
    layers = _block_layers(unfolded)
    assert layers and any(float((m.cwac_a - 1).abs().max()) > 1e-3 for m in layers)
    folded = copy.deepcopy(unfolded)
    for m in folded.modules():
        if isinstance(m, QuantLinear):
            m.pack_()
            m.fold_cwac_()
    for a, b in zip(_block_layers(unfolded), _block_layers(folded), strict=True):
        assert torch.equal(b.weight_scale, a.weight_scale * a.cwac_a[:, None])
    for x in data:
        with torch.no_grad():
            ref, out = unfolded(x), folded(x)
        assert float((out - ref).norm() / ref.norm()) < 1e-5


@pytest.mark.parametrize("method", ["ptq", "qwt_v2"])
def test_block_scales_save_load_bit_exact(method, tmp_path, monkeypatch):
    base = PTQConfig(w_bits=4, a_bits=8, weight_block_size=16)
    model, data = quantized_tiny(ptq_bert, base if method == "ptq" else QwTV2Config(base_config=base))
    save_quantized(model, str(tmp_path), backbone=BackboneSpec("unused"))
    from thrifty.compress.quant import serialize

    monkeypatch.setattr(serialize, "load_backbone", lambda *a, **k: ptq_bert())
    loaded, info = load_quantized(str(tmp_path))
    saved = info["quant_config"] if method == "ptq" else info["quant_config"]["base_config"]
    assert saved["weight_block_size"] == 16
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert sd[k].shape == sd2[k].shape and sd[k].dtype == sd2[k].dtype, k
        assert torch.equal(sd[k], sd2[k]), k
    assert any(sd[k].dim() == 2 and k.endswith("weight_scale") for k in sd)
    with torch.no_grad():
        for x in data:
            np.testing.assert_array_equal(loaded(x).numpy(), model(x).numpy())


def test_block_scales_plain_qdq_export_is_a_blocked_dequantize_linear(tmp_path):
    model, data = quantized_tiny(ptq_bert, PTQConfig(w_bits=4, a_bits=8, weight_block_size=16, embedding_bits=None))
    path = export_onnx(model, str(tmp_path / "qdq.onnx"), data[0], int_kernels=False)
    blocked = [
        n
        for n in onnx.load(path).graph.node
        if n.op_type == "DequantizeLinear" and any(a.name == "block_size" and a.i == 16 for a in n.attribute)
    ]
    assert len(blocked) == len(_block_layers(model))
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for x in data:
        with torch.no_grad():
            ref = model(x)
        out = torch.from_numpy(sess.run(["logits"], ort_feed(x))[0])
        assert float(((out - ref).abs().amax(-1) / ref.abs().amax(-1).clamp_min(1e-6)).max()) < 1e-4
