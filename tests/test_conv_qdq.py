"""conv_output_quant: a CNN with depthwise convs, ReLU6 and residual adds exports to QDQ that onnxruntime fuses to
QLinearConv / QLinearAdd, and the PyTorch simulation computes what the engine computes."""

import collections
import copy

import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from _ptq_models import batches, random_batchnorm_, tuned
from thrifty.backbones.base import Backbone
from thrifty.backbones.preprocess import ImagePreprocess
from thrifty.compress import PTQConfig, QwTV2Config, quantize_
from thrifty.compress.quant.layers import QuantConv2d
from thrifty.compress.quant.onnx_export import export_onnx, ort_feed
from thrifty.errors import ConfigError


class _SamePadConv(nn.Conv2d):
    """EfficientNet's static-same-padding conv: a zero-pad module inside the conv."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.static_padding = nn.ZeroPad2d((0, 1, 0, 1))

    def forward(self, x):
        return super().forward(self.static_padding(x))


class _MBConv(nn.Module):
    """expand 1x1 -> BN -> ReLU6 -> depthwise 3x3 (static zero padding inside the conv when strided) -> BN -> ReLU6
    -> project 1x1 -> BN
    (+ input when the shapes allow), one shared ReLU6 module as in EfficientNet-Lite."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        mid = 2 * cin
        self.expand, self.bn0 = nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid)
        conv = _SamePadConv if stride == 2 else nn.Conv2d
        self.dw = conv(mid, mid, 3, stride, 0 if stride == 2 else 1, groups=mid, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.project, self.bn2 = nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.act = nn.ReLU6()
        self.skip = cin == cout and stride == 1

    def forward(self, x):
        y = self.act(self.bn0(self.expand(x)))
        y = self.bn2(self.project(self.act(self.bn1(self.dw(y)))))
        return x + y if self.skip else y


class TinyMBNet(Backbone):
    kind = "cnn"

    def __init__(self):
        model = nn.Module()
        model.stem, model.bn = nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8)
        model.act = nn.ReLU6()
        model.blocks = nn.ModuleList([_MBConv(8, 8, 1), _MBConv(8, 8, 1), _MBConv(8, 16, 2), _MBConv(16, 16, 1)])
        model.head, model.bn_head = nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32)
        random_batchnorm_(model, bias_std=0.3)
        super().__init__(
            "tiny-mbnet", model, ImagePreprocess(size=(16, 16), mean=(0.5,) * 3, std=(0.5,) * 3), "random"
        )

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.blocks

    @property
    def num_features(self) -> int:
        return 32

    def embed(self, x):
        return self.model.act(self.model.bn(self.model.stem(x))), None

    def norm(self, h):
        return self.model.act(self.model.bn_head(self.model.head(h)))

    def pool(self, h, ctx):
        return h.mean((2, 3))


def _optimized(path, tmp_path):
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    opts.log_severity_level = 3
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    return sess, collections.Counter(n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node)


@pytest.mark.parametrize("qwt_v2", [False, True])
def test_conv_output_quant_fuses_to_qlinearconv_and_matches_engine(qwt_v2, tmp_path):
    bb = TinyMBNet().freeze_().eval()
    model = tuned(bb)
    data = batches(bb, n=4, size=16)
    base = PTQConfig(w_bits=8, a_bits=8, conv_output_quant=True)
    quantize_(model, QwTV2Config(base_config=base) if qwt_v2 else base, calib_data=data)
    convs = [m for m in model.modules() if isinstance(m, QuantConv2d)]
    assert len(convs) == 14 and all(m.qdq_form for m in convs)
    path = export_onnx(model, str(tmp_path / "model.onnx"), data[0])
    sess, ops = _optimized(path, tmp_path)
    assert ops["QLinearConv"] == 14 and "ConvInteger" not in ops and not {"Conv", "FusedConv"} & set(ops), ops
    assert ops["QLinearAdd"] == 3, ops  # every residual add
    # every ReLU6 absorbed by a uint8 quantizer (zero point 0, 255 s <= 6) but the head's, before global pooling
    assert ops["Clip"] == 1 and "Pad" not in ops, ops
    for x in data:
        with torch.no_grad():
            ref = model(x)
        out = torch.from_numpy(sess.run(["logits"], ort_feed(x))[0])
        # requantized int8 outputs: the engine's float requantization may round a tie the other way (1 LSB)
        err = (out - ref).abs().amax(-1) / ref.abs().amax(-1).clamp_min(1e-6)
        assert float(err.max()) < 2e-2, err
        assert float((out.argmax(-1) == ref.argmax(-1)).float().mean()) >= 0.9


def test_conv_output_quant_changes_the_simulation_only_when_selected():
    bb = TinyMBNet().freeze_().eval()
    data = batches(bb, n=2, size=8)
    outs = {}
    for flag in (False, True):
        model = tuned(TinyMBNet().freeze_().eval())
        quantize_(model, PTQConfig(conv_output_quant=flag), calib_data=data)
        with torch.no_grad():
            outs[flag] = model(data[0])
    assert not torch.equal(outs[False], outs[True])  # conv outputs and the residual stream are now quantized
    with torch.no_grad():
        float_out = tuned(TinyMBNet().freeze_().eval())(data[0])
    errs = {flag: float((out - float_out).abs().max()) for flag, out in outs.items()}
    assert errs[True] < 3 * errs[False], errs  # more quantization points, the same order of error


def test_conv_output_quant_needs_8bit_activations():
    with pytest.raises(ConfigError, match="8-bit activations"):
        PTQConfig(w_bits=8, a_bits=6, conv_output_quant=True)


def test_conv_output_quant_rebuilds_from_spec_and_state_dict():
    from thrifty.compress.quant.ptq import quant_state_of

    bb = TinyMBNet().freeze_().eval()
    model = tuned(bb)
    data = batches(bb, n=2, size=8)
    config = PTQConfig(conv_output_quant=True)
    quantize_(model, config, calib_data=data)
    spec = quant_state_of(model)["spec"]
    assert len(spec["conv_qdq"]["streams"]) == 5  # 4 block inputs + the last block's output
    fresh = copy.deepcopy(tuned(TinyMBNet().freeze_().eval()))
    quantize_(fresh, config.replace(step="prepare_for_loading"), spec=spec)
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(data[0]), model(data[0]))


@pytest.mark.parametrize(
    ("backbone", "method"), [("cifar-resnet:8", "ptq"), ("cifar-resnet:8", "qwt_v2"), ("timm:test_vit", "ptq")]
)
def test_cli_onnx_picks_the_qlinearconv_form_for_cnns_only(backbone, method, tmp_path):
    """`thrifty quantize --onnx` at W8A8: a CNN backbone gets conv_output_quant (its convs run as QLinearConv),
    a ViT keeps the default; `--set conv_output_quant=false` opts a CNN out; --calib-samples still reaches the
    compensation's config."""
    from thrifty.cli.main import main
    from thrifty.io import read_json

    common = ["--image-size", "16", "--data", "digits:1k", "--test-size", "20", "--calib-samples", "8"]
    common += ["--batch-size", "8", "--method", method, "--bits", "w8a8", "--onnx", "--no-progress"]
    extra = ["--random-init"] if backbone.startswith("timm:") else []
    for name, opt in (("auto", []), ("off", ["--set", "conv_output_quant=false"])):
        out = tmp_path / name
        with pytest.warns(UserWarning, match="untrained head"):
            assert main(["quantize", "--backbone", backbone, *extra, *common, *opt, "--output", str(out)]) == 0
        config = read_json(str(out / "quantize_config.json"))["quant_config"]
        chosen = config.get("base_config", config)["conv_output_quant"]
        assert config.get("calib_samples", 8) == 8
        _, ops = _optimized(str(out / "model.onnx"), tmp_path)
        expect = backbone.startswith("cifar") and name == "auto"
        assert chosen is expect
        assert (ops["QLinearConv"] > 0) is expect and (ops["ConvInteger"] > 0) is not expect
