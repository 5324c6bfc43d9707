"""PTQ / QwT / QwT-v2 on tiny ViT, BERT and CNN backbones: protocol, on/off switching, compensation, folding,
save/load."""

import copy

import pytest
import torch

from _ptq_models import batches, ptq_bert, ptq_cnn, ptq_vit, tuned
from thrifty.backbones import BackboneSpec
from thrifty.compress import PTQConfig, QwTConfig, QwTV2Config, load_quantized, quantize_, save_quantized
from thrifty.compress.quant import QuantConv2d, QuantLinear, SoftmaxQuant, quant_state, set_quant_state
from thrifty.compress.quant.layers import quant_modules
from thrifty.compress.quant.qwt import QwTBlock
from thrifty.compress.quant.serialize import size_report
from thrifty.errors import ConfigError


BACKBONES = {"vit": ptq_vit, "bert": ptq_bert, "cnn": ptq_cnn}


@pytest.fixture(scope="module", params=sorted(BACKBONES))
def setup(request):
    bb = BACKBONES[request.param]()
    model = tuned(bb)
    return request.param, model, batches(bb)


def _run(model, x):
    with torch.no_grad():
        return model(x)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_prepare_run_convert_equals_one_call(setup):
    kind, model, data = setup
    cfg = PTQConfig(w_bits=4, a_bits=4)
    one = copy.deepcopy(model)
    quantize_(one, cfg, calib_data=data)
    three = copy.deepcopy(model)
    quantize_(three, cfg)
    for x in data:
        _run(three, x)
    quantize_(three, cfg.replace(step="convert"))
    torch.testing.assert_close(_run(three, data[0]), _run(one, data[0]))
    names = {type(m) for m in one.modules()}
    assert QuantLinear in names and (QuantConv2d in names) == (kind != "bert")
    if kind != "cnn":
        assert SoftmaxQuant in names  # post-softmax probabilities are quantized (log2)
    spec = one.thrifty_quant["spec"]
    assert spec["edges"][-1] == "head" and (kind == "bert") == (len(spec["edges"]) == 1)
    assert all(spec["layers"][n]["w_bits"] == 8 for n in spec["edges"])
    assert sum(s["w_bits"] == 4 for s in spec["layers"].values()) >= 4
    if kind == "cnn":
        assert len(spec["folded_bn"]) == 5 and not any(isinstance(m, torch.nn.BatchNorm2d) for m in one.modules())
    with pytest.raises(ConfigError):
        quantize_(one, cfg)  # already quantized


def test_per_module_switch(setup):
    _, model, data = setup
    q = copy.deepcopy(model)
    quantize_(q, PTQConfig(w_bits=4, a_bits=4, pack=False), calib_data=data)
    ref = _run(model, data[0])
    out_q = _run(q, data[0])
    assert _rel(out_q, ref) > 1e-3
    with quant_state(q, False):
        torch.testing.assert_close(_run(q, data[0]), ref, rtol=1e-4, atol=1e-5)  # float (BN folded: ~exact)
    torch.testing.assert_close(_run(q, data[0]), out_q)  # flags restored
    blk = q.backbone.blocks[0]
    _, ctx = q.backbone.embed(data[0])
    with quant_state(q, False):
        h_fp, _ = q.backbone.embed(data[0])
    with torch.no_grad():
        out_q_blk = q.backbone.run_block(0, h_fp, ctx)
        set_quant_state(blk, False)  # this block in float, the rest untouched
        out = q.backbone.run_block(0, h_fp, ctx)
        set_quant_state(blk, True)
        ref_blk = model.backbone.run_block(0, h_fp, ctx)
    torch.testing.assert_close(out, ref_blk, rtol=1e-4, atol=1e-5)
    assert _rel(out_q_blk, ref_blk) > 1e-3
    assert any(m.quant_enabled for _, m in quant_modules(q))


def test_qwt_fits_every_block_and_logs_r2(setup):
    kind, model, data = setup
    q = copy.deepcopy(model)
    quantize_(q, QwTConfig(base_config=PTQConfig(w_bits=4, a_bits=4)), calib_data=data)
    log = q.thrifty_quant["spec"]["compensation_log"]
    assert [e["block"] for e in log] == [0, 1]
    assert all(e["r2"] > 0 and e["compensated"] for e in log)
    wrapped = [b for b in q.backbone.blocks if isinstance(b, QwTBlock)]
    assert len(wrapped) == 2
    comp = wrapped[0].comp
    assert all(p.dtype == torch.float16 for p in comp.parameters())
    assert not any(isinstance(m, (QuantLinear, QuantConv2d)) for m in comp.modules())  # excluded from quantization
    if kind == "cnn":
        assert comp.spec()["kind"] == "conv" and wrapped[1].comp.stride == 2
    d = q.backbone.num_features if kind != "cnn" else None
    if d:
        assert size_report(q)["compensation_params"] == 2 * (d * d + d)
    gated = copy.deepcopy(model)
    quantize_(gated, QwTConfig(base_config=PTQConfig(w_bits=4, a_bits=4), ridge=1e9), calib_data=data)
    assert not any(isinstance(b, QwTBlock) for b in gated.backbone.blocks)  # R^2 <= 0 -> no branch
    assert all(not e["compensated"] and e["r2"] <= 0 for e in gated.thrifty_quant["spec"]["compensation_log"])


def test_qwt_reduces_block_error_on_calibration_data(setup):
    _, model, data = setup
    ptq, qwt = copy.deepcopy(model), copy.deepcopy(model)
    cfg = PTQConfig(w_bits=4, a_bits=4, pack=False)
    quantize_(ptq, cfg, calib_data=data)
    quantize_(qwt, QwTConfig(base_config=cfg), calib_data=data)
    h, ctx = qwt.backbone.embed(data[0])
    with torch.no_grad():
        with quant_state(qwt, False):
            target = qwt.backbone.run_block(0, h, ctx)
        err_q = (ptq.backbone.run_block(0, h, ctx) - target).pow(2).sum()
        err_c = (qwt.backbone.run_block(0, h, ctx) - target).pow(2).sum()
    assert err_c < err_q


def test_cwac_fold_is_exact_and_free(setup):
    _, model, data = setup
    base = PTQConfig(w_bits=4, a_bits=4)
    plain, folded, unfolded = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    quantize_(plain, base, calib_data=data)
    quantize_(folded, QwTV2Config(base_config=base, fold=True), calib_data=data)
    quantize_(unfolded, QwTV2Config(base_config=base, fold=False), calib_data=data)
    assert any(m.cwac_a is not None for m in unfolded.modules() if isinstance(m, (QuantLinear, QuantConv2d)))
    for x in data:
        a, b = _run(folded, x), _run(unfolded, x)
        assert _rel(a, b) < 1e-5
    assert not torch.allclose(_run(folded, data[0]), _run(plain, data[0]))
    sd_plain, sd_fold = plain.state_dict(), folded.state_dict()
    assert sd_plain.keys() == sd_fold.keys()
    assert all(sd_plain[k].shape == sd_fold[k].shape and sd_plain[k].dtype == sd_fold[k].dtype for k in sd_plain)
    assert size_report(folded) == size_report(plain)
    log = folded.thrifty_quant["spec"]["compensation_log"]
    assert all(e["sse_after"] <= e["sse_before"] * (1 + 1e-6) + 1e-9 for e in log)


@pytest.mark.parametrize("method", ["ptq", "qwt", "qwt_v2"])
def test_save_load_round_trip(setup, method, tmp_path):
    kind, model, data = setup
    base = PTQConfig(w_bits=4, a_bits=6)
    cfg = {"ptq": base, "qwt": QwTConfig(base_config=base), "qwt_v2": QwTV2Config(base_config=base)}[method]
    q = copy.deepcopy(model)
    quantize_(q, cfg, calib_data=data)
    save_quantized(q, str(tmp_path), backbone=BackboneSpec("unused"))
    from thrifty.compress.quant import serialize

    real = serialize.load_backbone
    serialize.load_backbone = lambda *a, **k: BACKBONES[kind]()  # tiny models are not load_backbone specs
    try:
        loaded, info = load_quantized(str(tmp_path))
    finally:
        serialize.load_backbone = real
    assert info["quant_config"]["method"] == method
    torch.testing.assert_close(_run(loaded, data[1]), _run(q, data[1]))
    size = (tmp_path / "quantized_model.safetensors").stat().st_size
    assert size < 4 * sum(t.numel() for t in model.state_dict().values())


def test_cwac_targets_the_float_model(setup):
    """target="model" fits y_q to the float model's activations: the first quantized layer (float prefix, same
    input either way) gets the same (a, beta) as target="layer", and the logits move towards the float model's."""
    _, model, data = setup
    base = PTQConfig(w_bits=4, a_bits=4, pack=False, embedding_bits=None)  # float embeddings: a float prefix
    fits = {}
    for target in ("model", "layer"):
        q = copy.deepcopy(model)
        quantize_(q, QwTV2Config(base_config=base, fold=False, target=target), calib_data=data)
        fits[target] = q
    first = lambda q: next(m for m in q.modules() if isinstance(m, (QuantLinear, QuantConv2d)))  # noqa: E731
    torch.testing.assert_close(first(fits["model"]).cwac_a, first(fits["layer"]).cwac_a)
    torch.testing.assert_close(first(fits["model"]).cwac_beta, first(fits["layer"]).cwac_beta)
    ptq = copy.deepcopy(model)
    quantize_(ptq, base, calib_data=data)
    ref = torch.cat([_run(model, x) for x in data])
    err = lambda q: _rel(torch.cat([_run(q, x) for x in data]), ref)  # noqa: E731
    assert err(fits["model"]) < err(ptq)
    with pytest.raises(ConfigError, match="target"):
        QwTV2Config(target="output")
