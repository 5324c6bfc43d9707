"""Backbones: `load_backbone(spec)` for timm ViTs, Hugging Face encoders and packaged models."""

from __future__ import annotations

import torch

from thrifty.backbones.base import AdapterSite, Backbone, Inputs, ProjectionSite
from thrifty.backbones.preprocess import ImagePreprocess, TextPreprocess
from thrifty.errors import SpecError


def load_backbone(
    spec: str,
    *,
    checkpoint: str | None = None,
    pretrained: bool | None = None,
    image_size: int | None = None,
    max_length: int | None = None,
) -> Backbone:
    """Resolve a backbone spec and freeze it.

    Specs: `timm:<model name>` (e.g. `timm:vit_base_patch16_224.orig_in21k`), `hf:<id or local dir>`,
    `minilm` (packaged all-MiniLM-L6-v2), `efficientnet-lite0` (packaged ImageNet CNN).
    `pretrained=None` means: hub/packaged weights unless `checkpoint` is given; False means random init, seeded
    with 0 (the global RNG is left untouched) so that every process builds the same random backbone.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        bb = _load(spec, checkpoint=checkpoint, pretrained=pretrained, image_size=image_size, max_length=max_length)
    return bb.freeze_().eval()


def _load(spec: str, *, checkpoint, pretrained, image_size, max_length) -> Backbone:
    if spec.startswith("timm:"):
        from thrifty.backbones.timm_vit import load_timm_vit

        bb = load_timm_vit(spec[5:], checkpoint=checkpoint, pretrained=pretrained, image_size=image_size)
    elif spec in ("minilm", "all-minilm-l6-v2"):
        from thrifty.backbones.hf_encoder import load_hf_encoder, minilm_path

        bb = load_hf_encoder(
            minilm_path(), checkpoint=checkpoint, pretrained=pretrained, max_length=max_length or 128, alias="minilm"
        )
    elif spec.startswith("hf:"):
        from thrifty.backbones.hf_encoder import load_hf_encoder

        bb = load_hf_encoder(spec[3:], checkpoint=checkpoint, pretrained=pretrained, max_length=max_length or 128)
    elif spec == "efficientnet-lite0":
        from thrifty.backbones.efficientnet import load_efficientnet_lite0

        if checkpoint is not None:
            raise SpecError("efficientnet-lite0 loads its packaged weights; --checkpoint is not supported for it")
        bb = load_efficientnet_lite0(pretrained=pretrained, image_size=image_size)
    else:
        raise SpecError(
            f"unknown backbone spec {spec!r}; use timm:<name>, hf:<id or path>, minilm or efficientnet-lite0"
        )
    return bb


__all__ = ["AdapterSite", "Backbone", "ImagePreprocess", "Inputs", "ProjectionSite", "TextPreprocess", "load_backbone"]
