"""Save / load a quantized model: `quantized_model.safetensors` (the whole state dict: int codes, scales, biases,
float16 compensation, the non-quantized float tensors) + `quantize_config.json` (config, converted structure,
how to rebuild the float model). Weight codes of <= 4-bit layers are stored two per byte.

    save_quantized(model, "out/", backbone_spec="minilm")
    model, info = load_quantized("out/")
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from thrifty.backbones import Backbone, BackboneSpec, load_backbone
from thrifty.compress.quant.api import quantize_
from thrifty.compress.quant.config import FORMAT_VERSION, config_from_dict
from thrifty.compress.quant.layers import _QuantWeightLayer
from thrifty.compress.quant.ptq import quant_state_of
from thrifty.errors import CheckpointError
from thrifty.io import load_tensors, read_json, save_tensors, write_json


WEIGHTS_NAME = "quantized_model.safetensors"
CONFIG_NAME = "quantize_config.json"
NIBBLE = ".nibbles"


def backbone_spec_of(bb: Backbone) -> str:
    """The `load_backbone` spec that rebuilds `bb`'s architecture."""
    return "minilm" if bb.name == "hf:minilm" else bb.name


def _pack_nibbles(codes: torch.Tensor, signed: bool) -> torch.Tensor:
    flat = codes.reshape(-1).to(torch.int16) + (8 if signed else 0)  # 0..15
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return (flat[0::2] | (flat[1::2] << 4)).to(torch.uint8)


def _unpack_nibbles(packed: torch.Tensor, like: torch.Tensor, signed: bool) -> torch.Tensor:
    p = packed.to(torch.int16)
    flat = torch.stack([p & 0xF, p >> 4], 1).reshape(-1)[: like.numel()] - (8 if signed else 0)
    return flat.reshape(like.shape).to(like.dtype)


def _low_bit_layers(model: nn.Module) -> dict[str, _QuantWeightLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, _QuantWeightLayer) and m.w_bits <= 4}


def save_quantized(
    model: nn.Module,
    directory: str,
    *,
    backbone: BackboneSpec | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write a converted (packed) model; `model` is a TunedModel or a Backbone. The folder records the backbone's
    architecture (`backbone`, default: the spec the model's backbone was loaded with), not its weights."""
    from thrifty.tuners.base import TunedModel
    from thrifty.tuners.registry import model_record
    from thrifty.version import __version__

    state = quant_state_of(model)
    if state is None or state["status"] != "converted":
        raise CheckpointError("save_quantized needs a converted model (quantize_ with step='convert' first)")
    if any(isinstance(m, _QuantWeightLayer) and not m.packed for m in model.modules()):
        raise CheckpointError("save_quantized needs packed layers (convert with pack=True)")
    bb = model.backbone if isinstance(model, TunedModel) else model
    spec = backbone or bb.spec or BackboneSpec(backbone_spec_of(bb))
    tensors = dict(model.state_dict())
    for name, layer in _low_bit_layers(model).items():
        key = f"{name}.weight_codes"
        tensors[key + NIBBLE] = _pack_nibbles(tensors.pop(key), layer.weight_symmetric)
    info = {
        "format_version": FORMAT_VERSION,
        "thrifty_version": __version__,
        "quant_config": state["config"],
        "spec": state["spec"],
        "model": {
            **model_record(model),
            "backbone": spec.name,
            "backbone_kwargs": {
                k: v for k, v in (("image_size", spec.image_size), ("max_length", spec.max_length)) if v
            },
        },
        "size": size_report(model),
        "extra": extra or {},
    }
    os.makedirs(directory, exist_ok=True)
    save_tensors(os.path.join(directory, WEIGHTS_NAME), tensors, {"method": state["config"]["method"]})
    write_json(os.path.join(directory, CONFIG_NAME), info)


def load_quantized(directory: str, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the float architecture, the quantized structure, then load the saved tensors (strict)."""
    from thrifty.tuners.registry import load_frozen_, model_from_record

    info = read_json(os.path.join(directory, CONFIG_NAME))
    version = info.get("format_version") if isinstance(info, dict) else None
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{directory}: quantized format {version} is not supported (expected {FORMAT_VERSION})")
    try:
        meta, spec = info["model"], info["spec"]
        backbone, backbone_kwargs = meta["backbone"], dict(meta["backbone_kwargs"])
        config = config_from_dict(info["quant_config"]).replace(step="prepare_for_loading")
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{directory}: {CONFIG_NAME} is not a quantized model's config ({exc})") from exc
    bb = load_backbone(backbone, pretrained=False, **backbone_kwargs)
    model = model_from_record(bb, meta)
    try:
        quantize_(model, config, spec=spec)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{directory}: the saved structure does not fit {backbone} ({exc})") from exc
    tensors = load_tensors(os.path.join(directory, WEIGHTS_NAME))
    for name, layer in _low_bit_layers(model).items():
        key = f"{name}.weight_codes"
        if key + NIBBLE in tensors:
            tensors[key] = _unpack_nibbles(tensors.pop(key + NIBBLE), layer.weight_codes, layer.weight_symmetric)
    return load_frozen_(model, tensors, directory).to(device).eval(), info


def size_report(model: nn.Module) -> dict[str, Any]:
    """Parameter counts and storage bits: quantized weights at their width, compensation at 16 bits, the rest
    (biases, scales, norms, embeddings) at 32 bits."""
    from thrifty.compress.quant.qwt import ConvCompensation, LinearCompensation

    q_params = q_bits = comp = 0
    for m in model.modules():
        if isinstance(m, _QuantWeightLayer):
            n = m.weight_codes.numel()
            q_params, q_bits = q_params + n, q_bits + n * m.w_bits
        elif isinstance(m, (LinearCompensation, ConvCompensation)):
            comp += sum(p.numel() for p in m.parameters())
    total = sum(t.numel() for t in model.state_dict().values())
    other = total - q_params - comp
    return {
        "state_dict_numel": total,
        "quantized_weight_params": q_params,
        "compensation_params": comp,
        "other_numel": other,
        "storage_bytes": (q_bits + 16 * comp + 32 * other) // 8,
    }
