"""ONNX QDQ export of quantized tiny models runs in onnxruntime and agrees with the PyTorch simulation."""

import copy

import numpy as np
import onnx
import pytest
import torch

from _ptq_models import batches, ptq_bert, ptq_cnn, ptq_vit, tuned
from thrifty.compress import PTQConfig, QwTConfig, QwTV2Config, quantize_
from thrifty.compress.quant.onnx_export import export_onnx, ort_logits, ort_session


@pytest.mark.parametrize(
    ("name", "make", "config"),
    [
        ("vit-qwt_v2-w8a8", ptq_vit, QwTV2Config(base_config=PTQConfig(w_bits=8, a_bits=8))),
        pytest.param(
            "bert-qwt-w8a8",
            ptq_bert,
            QwTConfig(base_config=PTQConfig(w_bits=8, a_bits=8)),
            marks=pytest.mark.slow,  # ~25 s: the exporter walks every HF op; run with -m slow
        ),
        ("cnn-qwt-w4a6", ptq_cnn, QwTConfig(base_config=PTQConfig(w_bits=4, a_bits=6))),
    ],
)
def test_export_runs_in_onnxruntime_and_matches(name, make, config, tmp_path):
    bb = make()
    model = tuned(bb)
    data = batches(bb)
    quantize_(model, copy.deepcopy(config), calib_data=data)
    path = export_onnx(model, str(tmp_path / "model.onnx"), data[0])
    graph = onnx.load(path).graph
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    int_types = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4)
    int_weights = [i for i in graph.initializer if i.data_type in int_types and len(i.dims) >= 2]
    assert len(int_weights) >= 4  # weights are stored as integer codes (<= 4-bit conv weights as INT4)
    if isinstance(config, QwTConfig):
        assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in graph.initializer)  # fp16 compensation
    sess = ort_session(path, threads=1)
    for x in data[:2]:
        with torch.no_grad():
            ref = model(x)
        out = ort_logits(sess, x)
        assert out.shape == ref.shape
        # identical up to float rounding (a rare half-way case may flip one activation code)
        assert float((out - ref).abs().max()) < 0.05 * float(ref.abs().max()) + 1e-4
        assert float((out - ref).norm() / ref.norm()) < 1e-2
        assert np.mean((out.argmax(-1) == ref.argmax(-1)).numpy()) >= 0.75
