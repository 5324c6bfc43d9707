"""Tiny models for the PTQ tests: a 2-block timm ViT, a 2-layer BERT, a 2-block CNN with BatchNorm."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from thrifty.backbones.base import Backbone
from thrifty.backbones.preprocess import ImagePreprocess, TextPreprocess


def ptq_vit() -> Backbone:
    import timm

    from thrifty.backbones.timm_vit import TimmViT

    model = timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=32, depth=2)
    return TimmViT("timm:tiny", model, ImagePreprocess(size=(32, 32)), "random").freeze_().eval()


def ptq_bert() -> Backbone:
    from transformers import BertConfig, BertModel

    from thrifty.backbones.hf_encoder import HFEncoder

    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    cfg._attn_implementation = "sdpa"
    model = BertModel(cfg, add_pooling_layer=False).eval()
    tok = SimpleNamespace(vocab_size=64, name_or_path="tiny")
    return HFEncoder("hf:tiny", model, TextPreprocess(tok, 8), "random").freeze_().eval()


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act = nn.ReLU6()
        self.skip = cin == cout and stride == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))
        return x + y if self.skip else y


def random_batchnorm_(model: nn.Module, bias_std: float, seed: int = 0) -> None:
    """Non-trivial BatchNorm statistics and affine parameters (folding them must matter), seeded."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * bias_std)


class TinyCNN(Backbone):
    kind = "cnn"

    def __init__(self):
        model = nn.Module()
        model.stem = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        model.bn = nn.BatchNorm2d(8)
        model.blocks = nn.ModuleList([_Block(8, 8, 1), _Block(8, 16, 2)])
        random_batchnorm_(model, bias_std=0.1)
        super().__init__("tiny-cnn", model, ImagePreprocess(size=(16, 16), mean=(0.5,) * 3, std=(0.5,) * 3), "random")

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.blocks

    @property
    def num_features(self) -> int:
        return 16

    def embed(self, x):
        return torch.clamp(self.model.bn(self.model.stem(x)), 0, 6), None

    def pool(self, h, ctx):
        return h.mean((2, 3))


def ptq_cnn() -> Backbone:
    return TinyCNN().freeze_().eval()


def tuned(backbone: Backbone, num_classes: int = 3):
    from thrifty.tuners import get_tuned_model, make_config

    torch.manual_seed(0)
    model = get_tuned_model(backbone, make_config("full"), num_classes).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def batches(backbone: Backbone, n: int = 3, size: int = 8) -> list:
    out = [backbone.random_inputs(size, seed=i) for i in range(n)]
    for x in out:
        if isinstance(x, dict):
            x["attention_mask"][: size // 2, -3:] = 0  # some padding
    return out


def export_embedding_lookup(q: nn.Module, ids: torch.Tensor, path: str) -> str:
    """Export a packed QuantEmbedding alone, `x -> q(x.long())` (input named "x"), with the deployment ops."""
    from thrifty.compress.quant import embedding
    from thrifty.compress.quant.int_ops import translation_table
    from thrifty.compress.quant.onnx_export import export_mode

    class Lookup(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = q

        def forward(self, x):
            return self.emb(x.long())

    table = {**translation_table(), **embedding.translation_table()}
    with export_mode(Lookup().eval()) as m, torch.no_grad():
        torch.onnx.export(
            m, (ids,), path, dynamo=True, opset_version=21, custom_translation_table=table, input_names=["x"]
        )
    return path


def quantized_tiny(make, config) -> tuple:
    """A tiny tuned model of backbone `make()` quantized with (a copy of) `config` on its seeded batches;
    returns (model, batches)."""
    import copy

    from thrifty.compress import quantize_

    bb = make()
    model = tuned(bb)
    data = batches(bb)
    quantize_(model, copy.deepcopy(config), calib_data=data)
    return model, data


def tuned_bert() -> tuple:
    """The tiny tuned BERT classifier (float) and its seeded batches."""
    bb = ptq_bert()
    return tuned(bb), batches(bb)


def stacked_logits(model, data) -> torch.Tensor:
    """model's logits on every batch of `data`, concatenated (no grad)."""
    with torch.no_grad():
        return torch.cat([model(x) for x in data])
