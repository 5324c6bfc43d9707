"""Deployment-file size (issue 21): 4-bit block-scaled embedding tables on GatherBlockQuantized, float16-exact
scales, and the lossless compaction of the exported graph (the engine computes the same values)."""

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, numpy_helper

from _ptq_models import export_embedding_lookup, ptq_bert, quantized_tiny
from thrifty.compress import PTQConfig
from thrifty.compress.quant.embedding import QuantEmbedding, gather_blocks, table_block
from thrifty.compress.quant.onnx_export import export_onnx, finalize_onnx_, nbits_block, ort_feed
from thrifty.compress.quant.weights import half_representable, search_weight
from thrifty.errors import ConfigError


def _optimized(path: str, tmp_path, tag: str = "optimized"):
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / f"{tag}.onnx")
    opts.log_severity_level = 3
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    return sess, onnx.load(opts.optimized_model_filepath)


def _runtime_casts_of_initializers(model) -> int:
    """Casts left in an optimized graph that widen a float16 / int32 initializer (what the compaction narrowed)."""
    narrow = {t.name for t in model.graph.initializer if t.data_type in (TensorProto.FLOAT16, TensorProto.INT32)}
    return sum(1 for n in model.graph.node if n.op_type == "Cast" and n.input[0] in narrow)


def test_half_scales_are_float16_values_and_codes_use_them():
    torch.manual_seed(0)
    w = torch.randn(40, 24) * torch.logspace(-6, 1, 40)[:, None]
    codes, scale, _ = search_weight(w, 8, True, half_scales=True)
    assert torch.equal(scale.half().float(), scale) and bool((scale > 0).all())
    assert torch.equal(codes.float(), torch.clamp(torch.round(w / scale[:, None]), -127, 127))
    _, exact, _ = search_weight(w, 8, True)
    normal = exact >= 2.0**-14  # float16's normal range: only the rounding (<= 2^-11) moves these
    assert int(normal.sum()) >= 15 and float(((scale - exact).abs() / exact)[normal].max()) < 0.05
    assert bool((scale[~normal] < 2.0**-13).all())  # subnormal float16 scales: coarse, but tiny rows stay tiny
    assert torch.equal(half_representable(torch.tensor([1e-9, 3.0, 1e6])), torch.tensor([2.0**-24, 3.0, 65504.0]))


def test_table_block_and_nbits_block_choose_dividing_powers_of_two():
    assert table_block(384, 128) == 128 and table_block(96, 128) == 32 and table_block(40, 128) == 0
    assert nbits_block(384) == 128 and nbits_block(1536) == 512 and nbits_block(40) == 32
    assert nbits_block(384, 64) == 64
    with pytest.raises(ConfigError):
        PTQConfig(embedding_block_size=48)
    assert PTQConfig(w_bits=4, a_bits=16).embedding_bits == 4 and PTQConfig().embedding_bits == 8
    assert PTQConfig(w_bits=4, a_bits=8, embedding_bits=8).embedding_bits == 8


def test_int4_block_embedding_matches_onnxruntime_and_takes_half_a_byte_per_value(tmp_path):
    torch.manual_seed(0)
    v, d, block = 50, 64, 32
    emb = torch.nn.Embedding(v, d)
    q = QuantEmbedding(emb)
    q.quantize_weight_(4, half_scales=True, block_size=block)
    assert q.block_size == block and q.weight_scale.shape == (v, d // block)
    assert int(q.weight_codes.abs().max()) <= 7
    # the table: one float32 product per value, per block of `block` values of a row
    ref_table = (q.weight_codes.float().reshape(v, d // block, block) * q.weight_scale[..., None]).reshape(v, d)
    assert float((ref_table - emb.weight).abs().max()) <= float(q.weight_scale.max()) / 2 + 1e-7
    ids = torch.randint(0, v, (3, 7))
    with torch.no_grad():
        assert torch.equal(q(ids), ref_table[ids])
        assert torch.equal(gather_blocks(q.weight_codes, q.weight_scale, ids, block), ref_table[ids])
    q.pack_()

    path = export_embedding_lookup(q, ids, str(tmp_path / "emb.onnx"))
    finalize_onnx_(path)
    graph = onnx.load(path).graph
    inits = {t.name: t for t in graph.initializer}
    (node,) = [n for n in graph.node if n.op_type == "GatherBlockQuantized"]
    data = inits[node.input[0]]
    assert data.data_type == TensorProto.INT4 and len(data.raw_data) == v * d // 2
    scale_cast = next(n for n in graph.node if n.op_type == "Cast" and n.output[0] == node.input[2])
    scales = inits[scale_cast.input[0]]
    assert scales.data_type == TensorProto.FLOAT16 and len(scales.raw_data) == v * (d // block) * 2
    np.testing.assert_array_equal(numpy_helper.to_array(scales).astype(np.float32), q.weight_scale.numpy())
    sess, opt = _optimized(path, tmp_path)
    assert _runtime_casts_of_initializers(opt) == 0  # the float16 scales are folded back to float32 at load
    out = sess.run(None, {sess.get_inputs()[0].name: ids.numpy()})[0]
    np.testing.assert_array_equal(out, ref_table[ids].numpy())  # bit-exact


@pytest.mark.parametrize("bits", [(8, 8), (4, 16)])
def test_compaction_is_lossless_and_the_simulation_matches_onnxruntime(bits, tmp_path):
    w, a = bits
    model, data = quantized_tiny(ptq_bert, PTQConfig(w_bits=w, a_bits=a, softmax_quantizer="uniform"))
    words = [m for m in model.modules() if isinstance(m, QuantEmbedding)]
    assert words and all(m.bits == (4 if w == 4 else 8) for m in words)  # auto: 4-bit tables with 4-bit weights
    plain = export_onnx(model, str(tmp_path / "plain.onnx"), data[0], compact=False)
    small = export_onnx(model, str(tmp_path / "small.onnx"), data[0])
    p, s = onnx.load(plain), onnx.load(small)
    assert s.ByteSize() < p.ByteSize()
    assert len(s.graph.value_info) == 0 and not any(n.op_type in ("Constant", "Identity") for n in s.graph.node)
    assert all(len(t.name) <= 3 for t in s.graph.initializer)
    assert [i.name for i in s.graph.input] == ["input_ids", "attention_mask"] and s.graph.output[0].name == "logits"
    types = collections.Counter(t.data_type for t in s.graph.initializer)
    assert types[TensorProto.FLOAT16] >= 1  # the half_scales are stored as float16
    if w == 8:  # a static sequence length: only its rows of the int8 position table stay (Slice + Gather folded)
        positions = model.backbone.model.embeddings.position_embeddings.weight_codes.shape
        assert not any(list(t.dims) == list(positions) for t in s.graph.initializer)
        rows = [data[0]["input_ids"].shape[1], positions[1]]
        assert any(t.data_type == TensorProto.INT8 and list(t.dims)[-2:] == rows for t in s.graph.initializer)
    ops = collections.Counter(n.op_type for n in s.graph.node)
    if w == 4:
        table_ops = [n for n in s.graph.node if n.op_type == "GatherBlockQuantized"]
        assert len(table_ops) == len(words) and ops["MatMulNBits"] >= 1
        inits = {t.name: t for t in s.graph.initializer}
        for n in table_ops:
            t = inits[n.input[0]]
            assert t.data_type == TensorProto.INT4 and len(t.raw_data) == int(np.prod(t.dims)) // 2
    sess_p, _ = _optimized(plain, tmp_path, "p")
    sess_s, opt = _optimized(small, tmp_path, "s")
    assert _runtime_casts_of_initializers(opt) == 0
    for x in data:
        out_s = sess_s.run(["logits"], ort_feed(x))[0]
        np.testing.assert_array_equal(out_s, sess_p.run(["logits"], ort_feed(x))[0])  # same values, same kernels
        with torch.no_grad():
            ref = model(x)
        err = (torch.from_numpy(out_s) - ref).abs().amax(-1) / ref.abs().amax(-1).clamp_min(1e-6)
        assert float(err.max()) < 1e-4, err
