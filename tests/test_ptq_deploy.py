"""The deployment export: integer kernels in onnxruntime's optimized graph, int8 embeddings, MatMulNBits packing,
QwT-v2 folded into int4 block scales, per-sample agreement of the PyTorch simulation with onnxruntime."""

import collections
import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from _ptq_models import export_embedding_lookup, ptq_bert, ptq_cnn, quantized_tiny
from thrifty.compress import PTQConfig, QwTV2Config
from thrifty.compress.quant.embedding import QuantEmbedding
from thrifty.compress.quant.int_ops import gather_rows, matmul_nbits, pack_nbits, unpack_nbits
from thrifty.compress.quant.layers import QuantLinear
from thrifty.compress.quant.onnx_export import export_mode, export_onnx, ort_feed
from thrifty.compress.quant.weights import dequantize_per_channel, search_weight


FLOAT_MATMULS = {"MatMul", "Gemm", "FusedMatMul", "FusedGemm", "Conv", "FusedConv"}


def optimized(path: str, tmp_path) -> tuple[ort.InferenceSession, collections.Counter, onnx.ModelProto]:
    """A session at onnxruntime's default (highest) optimization level and the op types of its optimized graph."""
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    opts.log_severity_level = 3
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    model = onnx.load(opts.optimized_model_filepath)
    return sess, collections.Counter(n.op_type for n in model.graph.node), model


@pytest.mark.parametrize("qwt_v2", [False, True])
def test_tiny_transformer_runs_integer_kernels_and_matches_per_sample(qwt_v2, tmp_path):
    base = PTQConfig(w_bits=8, a_bits=8, softmax_quantizer="uniform")
    model, data = quantized_tiny(ptq_bert, QwTV2Config(base_config=base) if qwt_v2 else base)
    path = export_onnx(model, str(tmp_path / "model.onnx"), data[0])
    sess, ops, opt_model = optimized(path, tmp_path)
    assert not FLOAT_MATMULS & set(ops), ops  # no float MatMul / Gemm survives onnxruntime's optimization
    linears = sum(isinstance(m, QuantLinear) for m in model.modules())
    attention = 2 * sum(1 for n, _ in model.named_modules() if n.endswith("thrifty_softmax_quant"))
    assert ops["MatMulIntegerToFloat"] == linears + attention  # every projection and both attention products
    word = next(m for n, m in model.named_modules() if n.endswith("word_embeddings"))
    assert isinstance(word, QuantEmbedding)
    types = {t.name: t.data_type for t in onnx.load(path).graph.initializer}
    gathers = [n for n in onnx.load(path).graph.node if n.op_type == "Gather" and types.get(n.input[0])]
    assert any(types[n.input[0]] == TensorProto.INT8 for n in gathers)  # int8 embedding table
    assert "DequantizeLinear" not in {n.op_type for n in opt_model.graph.node if n.input and n.input[0] in types}
    for x in data:
        with torch.no_grad():
            ref = model(x)
        out = torch.from_numpy(sess.run(["logits"], ort_feed(x))[0])
        # per sample: the same logits up to float summation order (integer accumulation is exact in the engine)
        err = (out - ref).abs().amax(-1) / ref.abs().amax(-1).clamp_min(1e-6)
        assert float(err.max()) < 1e-4, err
        assert torch.equal(out.argmax(-1), ref.argmax(-1))


def test_cnn_runs_conv_integer_and_matches(tmp_path):
    model, data = quantized_tiny(ptq_cnn, PTQConfig(w_bits=8, a_bits=8))
    path = export_onnx(model, str(tmp_path / "model.onnx"), data[0])
    sess, ops, _ = optimized(path, tmp_path)
    assert not FLOAT_MATMULS & set(ops), ops
    assert ops["ConvInteger"] == 5 and ops["MatMulIntegerToFloat"] == 1
    for x in data:
        with torch.no_grad():
            ref = model(x)
        out = torch.from_numpy(sess.run(["logits"], ort_feed(x))[0])
        assert float((out - ref).abs().max()) < 1e-4 * float(ref.abs().max())


def test_int8_gather_embedding_equals_dequantized_lookup(tmp_path):
    torch.manual_seed(0)
    emb = torch.nn.Embedding(50, 12)
    q = QuantEmbedding(emb)
    q.quantize_weight_(8)
    assert q.weight_codes.dtype == torch.int8 and q.weight_scale.shape == (50,)
    codes, scale, _ = search_weight(emb.weight.detach(), 8, True)  # per-row symmetric, as weights per channel
    table = dequantize_per_channel(codes, scale, torch.zeros(50, dtype=torch.int8))
    ids = torch.randint(0, 50, (3, 7))
    assert torch.equal(q(ids), table[ids])
    assert torch.equal(gather_rows(q.weight_codes, q.weight_scale, ids), table[ids])
    assert float((table - emb.weight).abs().max()) <= float(scale.max()) / 2 + 1e-7  # it is a quantization
    q.pack_()

    path = export_embedding_lookup(q, ids, str(tmp_path / "emb.onnx"))
    graph = onnx.load(path).graph
    types = {t.name: t.data_type for t in graph.initializer}
    assert [types.get(n.input[0]) for n in graph.node if n.op_type == "Gather"].count(TensorProto.INT8) == 1
    out = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": ids.numpy()})[0]
    assert np.array_equal(out, table[ids].numpy())


def _table():
    from thrifty.compress.quant.int_ops import translation_table

    return translation_table()


@pytest.mark.parametrize(("symmetric", "k", "block"), [(True, 64, 32), (True, 40, 16), (False, 72, 32)])
def test_matmul_nbits_packing_round_trips_and_matches_onnxruntime(symmetric, k, block):
    torch.manual_seed(0)
    n = 6
    w = torch.randn(n, k)
    codes, scale, zp = search_weight(w, 4, symmetric)
    packed, scales, zps = pack_nbits(codes, scale, zp, symmetric, block)
    blocks = -(-k // block)
    assert packed.shape == (n, blocks, block // 2) and packed.dtype == torch.uint8
    assert scales.shape == (n * blocks,) and zps.shape == (n * -(-blocks // 2),)
    w_hat = dequantize_per_channel(codes, scale, zp)
    assert torch.equal(unpack_nbits(packed, scales, zps, k, block), w_hat)  # the round trip is exact
    # the engine reads the same blobs: MatMulNBits (accuracy_level 0) against F.linear on the unpacked weight
    x = torch.randn(3, k)
    bias = torch.randn(n)
    node = helper.make_node(
        "MatMulNBits",
        ["x", "B", "s", "z", "", "bias"],
        ["y"],
        domain="com.microsoft",
        K=k,
        N=n,
        bits=4,
        block_size=block,
    )
    inits = [numpy_helper.from_array(t.numpy(), name) for t, name in ((packed, "B"), (scales, "s"), (zps, "z"))]
    inits.append(numpy_helper.from_array(bias.numpy(), "bias"))
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, n])],
        inits,
    )
    proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    out = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.numpy()}
    )
    ref = torch.nn.functional.linear(x, w_hat, bias)
    assert torch.allclose(torch.from_numpy(out[0]), ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(matmul_nbits(x, packed, scales, zps, bias, k, n, block, 0), ref, rtol=1e-6, atol=1e-6)


def test_qwt_v2_folded_into_int4_block_scales_equals_unfolded():
    base = PTQConfig(w_bits=4, a_bits=16, embedding_bits=None)
    unfolded, data = quantized_tiny(ptq_bert, QwTV2Config(base_config=base, fold=False))
    layers = [m for m in unfolded.modules() if isinstance(m, QuantLinear) and m.w_bits == 4]
    assert layers and all(m.cwac_a is not None for m in layers)
    assert any(float((m.cwac_a - 1).abs().max()) > 1e-3 for m in layers)  # CWAC really changes something
    folded = copy.deepcopy(unfolded)
    for m in folded.modules():
        if isinstance(m, QuantLinear):
            m.pack_()
            m.fold_cwac_()
    for x in data:
        with torch.no_grad():
            ref = unfolded(x)  # y = a * (x W_hat^T + b) + beta, per channel
            with export_mode(folded):  # MatMulNBits blobs with a folded into every block scale, fp32 simulation
                out = folded(x)
        assert float((out - ref).norm() / ref.norm()) < 1e-5


def test_evaluate_onnx_reads_any_export_by_input_name(tmp_path):
    """`thrifty eval --onnx` on a foreign export: another input name, the first output taken as logits."""
    from torch.utils.data import TensorDataset

    from thrifty.cli.eval import _onnx_backbone
    from thrifty.compress.quant.onnx_export import evaluate_onnx
    from thrifty.errors import ConfigError

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)).eval()
    path = str(tmp_path / "foreign.onnx")
    torch.onnx.export(
        net,
        (torch.randn(2, 3, 2, 2),),
        path,
        dynamo=True,
        input_names=["pixel_values"],
        dynamic_shapes=({0: torch.export.Dim("b")},),
    )
    x, y = torch.randn(10, 3, 2, 2), torch.randint(0, 3, (10,))
    res = evaluate_onnx(path, TensorDataset(x, y), batch_size=4)
    with torch.no_grad():
        expected = float((net(x).argmax(-1) == y).float().mean())
    assert res["samples"] == 10 and abs(res["accuracy"] - expected) < 1e-6
    args = type("A", (), {"onnx": path, "backbone": None})()
    with pytest.raises(ConfigError, match="--backbone"):
        _onnx_backbone(args)
