"""Compressed models on disk: `model.safetensors` (the upstream model's own state dict: timm or transformers key
names, with a timm classifier in timm's `head` slot) + `compression.json` (config, structure: removed attention
blocks and kept MLP units per block, counted MACs, ranking, recovery recipe, latency where measured).

With stock timm, outside thrifty:

    m = timm.create_model(name, num_classes=C, img_size=S)
    apply_structure_(m, {int(b): u for b, u in json.load(open("compression.json"))["blocks"].items()})
    m.load_state_dict(safetensors.torch.load_file("model.safetensors"))
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from thrifty.compress.dc_vit.structure import apply_structure_, find_backbone
from thrifty.errors import CheckpointError, ConfigError
from thrifty.io import load_tensors, read_json, save_tensors, write_json


MANIFEST = "compression.json"
WEIGHTS = "model.safetensors"
HEAD = "head.safetensors"  # classifier of a backbone without an upstream head slot (transformers encoders)


def _head_slot(model: nn.Module, backbone: nn.Module) -> tuple[nn.Module | None, str | None]:
    head = getattr(model, "head", None) if model is not backbone else None
    if head is None:
        return None, None
    return head, backbone.upstream_head_name()


def _spec_dict(backbone: nn.Module, spec: Any) -> dict[str, Any]:
    """The BackboneSpec to record: `spec` (a BackboneSpec, spec string or dict), else the one the backbone was
    loaded with."""
    from thrifty.backbones import BackboneSpec

    if spec is None:
        spec = backbone.spec or BackboneSpec(backbone.name)
    elif isinstance(spec, dict):
        spec = BackboneSpec.from_dict(spec)
    elif not isinstance(spec, BackboneSpec):
        spec = BackboneSpec.of(str(spec))
    return spec.to_dict()


def save_dc_vit(
    model: nn.Module, directory: str, *, backbone: Any = None, extra: dict[str, Any] | None = None
) -> None:
    """Write a model compressed by `compress_dc_vit_` (see the module docstring). `backbone`: the BackboneSpec to
    record (default: the spec the model's backbone was loaded with); the compressor registry's `save` signature."""
    info = getattr(model, "thrifty_dc_vit", None)
    if not isinstance(info, dict):
        raise ConfigError("this model was not compressed by dc_vit (no `thrifty_dc_vit` record); run compress_ first")
    spec = backbone
    backbone = find_backbone(model)
    os.makedirs(directory, exist_ok=True)
    state = {k: v for k, v in backbone.model.state_dict().items()}
    head, slot = _head_slot(model, backbone)
    head_meta = None
    if head is not None:
        head_state = head.state_dict()
        if slot is not None:
            state.update({f"{slot}.{k}": v for k, v in head_state.items()})
        else:
            save_tensors(os.path.join(directory, HEAD), head_state)
        head_meta = {
            "slot": slot,
            "num_classes": getattr(model, "num_classes", None),
            "objective": getattr(model, "objective", "classification"),
        }
    save_tensors(os.path.join(directory, WEIGHTS), state, {"method": "dc_vit", "backbone": backbone.name})
    from thrifty.version import __version__

    manifest = {
        **info,
        "backbone": {"spec": _spec_dict(backbone, spec), "name": backbone.name},
        "format": "timm" if backbone.kind == "vit" else "transformers",
        "head": head_meta,
        "extra": extra,
        "thrifty_version": __version__,
    }
    write_json(os.path.join(directory, MANIFEST), manifest)


def load_dc_vit(directory: str, device: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """(model, compression record) of a folder written by `save_dc_vit`: the backbone is rebuilt from its spec,
    restructured, and loaded strictly; a classifier head makes it a TunedModel. CheckpointError on a foreign or
    corrupt folder."""
    from thrifty.backbones import BackboneSpec, load_backbone

    info = read_json(os.path.join(directory, MANIFEST))
    config = info.get("config") if isinstance(info, dict) else None
    if not isinstance(config, dict) or config.get("method") != "dc_vit":
        raise CheckpointError(f"{directory}/{MANIFEST} was not written by dc_vit; load it with its own compressor")
    try:
        spec = BackboneSpec.from_dict(info["backbone"]["spec"]).replace(checkpoint=None, random_init=True)
        blocks = {int(b): u for b, u in info["blocks"].items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{directory}/{MANIFEST} is incomplete ({exc!r}); re-create the folder") from exc
    state = load_tensors(os.path.join(directory, WEIGHTS))
    backbone = load_backbone(spec)
    apply_structure_(backbone, blocks)
    head_meta = info.get("head")
    head_state = None
    if head_meta:
        slot = head_meta.get("slot")
        if slot:
            head_state = {k[len(slot) + 1 :]: state.pop(k) for k in list(state) if k.startswith(slot + ".")}
        else:
            head_state = load_tensors(os.path.join(directory, HEAD))
    try:
        backbone.model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{directory}/{WEIGHTS} does not fit the saved structure ({exc})") from exc
    model: nn.Module = backbone
    if head_meta:
        from thrifty.tuners import get_tuned_model, make_config

        objective = head_meta["objective"]
        model = get_tuned_model(backbone, make_config("full"), head_meta["num_classes"], objective=objective)
        try:
            model.head.load_state_dict(head_state, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{directory}: the saved head does not fit ({exc})") from exc
    for p in model.parameters():
        p.requires_grad_(False)
    model.thrifty_dc_vit = {k: v for k, v in info.items() if k not in ("backbone", "format", "head", "extra")}
    return model.to(device).eval(), info


@torch.no_grad()
def latency_ms(model: nn.Module, batch_size: int = 32, repeats: int = 5, seed: int = 0) -> float:
    """Median wall time (ms) of `model` on one batch of random inputs, after one warm-up run (CPU threads as set)."""
    import time

    backbone = find_backbone(model)
    x = backbone.random_inputs(batch_size, seed=seed)
    model.eval()
    model(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(x)
        times.append((time.perf_counter() - t0) * 1000.0)
    return sorted(times)[len(times) // 2]
