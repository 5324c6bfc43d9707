"""Backbones: `load_backbone(spec)` resolves a `BackboneSpec` (or a spec string plus keywords) through the
backbone registry (`register_backbone`; built-ins: timm ViTs, Hugging Face encoders, packaged models)."""

from __future__ import annotations

import torch

from thrifty.backbones.base import AdapterSite, Backbone, Inputs, ProjectionSite
from thrifty.backbones.preprocess import ImagePreprocess, TablePreprocess, TextPreprocess
from thrifty.backbones.registry import BACKBONES, available_backbones, backbone_kind, register_backbone
from thrifty.backbones.spec import BackboneSpec


def load_backbone(
    spec: str | BackboneSpec,
    *,
    checkpoint: str | None = None,
    pretrained: bool | None = None,
    image_size: int | None = None,
    max_length: int | None = None,
) -> Backbone:
    """Build the backbone of `spec` and freeze it (the keywords fill a spec string; see BackboneSpec).

    `pretrained=None` means: hub/packaged weights unless `checkpoint` is given; False means random init, seeded
    with 0 (the global RNG is left untouched) so that every process builds the same random backbone.
    """
    spec = BackboneSpec.of(
        spec, checkpoint=checkpoint, pretrained=pretrained, image_size=image_size, max_length=max_length
    )
    kind = backbone_kind(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        bb = kind.loader(spec)
    bb.spec = spec
    return bb.freeze_().eval()


__all__ = [
    "BACKBONES",
    "AdapterSite",
    "Backbone",
    "BackboneSpec",
    "ImagePreprocess",
    "Inputs",
    "ProjectionSite",
    "TablePreprocess",
    "TextPreprocess",
    "available_backbones",
    "load_backbone",
    "register_backbone",
]
