"""Dummy compressors for the registry and contract tests, written as a new compressor would be.

`ScaleHeadConfig` ("scale_head"): multiplies the classifier's weights by `scale` and moves its bias to the mean
calibration logit per class (so it uses its calibration batches); saves model.safetensors + compress_config.json.
`register_dummy(broken=True)` registers the same compressor under "scale_head_broken" with a `load` that forgets
the saved tensors (it returns the rebuilt float model): the contract check must catch it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from thrifty.backbones import BackboneSpec
from thrifty.compress import config_dict, register_compressor
from thrifty.compress.calibration import iter_inputs
from thrifty.errors import CheckpointError
from thrifty.io import load_tensors, read_json, save_tensors, write_json
from thrifty.tuners.config import check


MANIFEST = "compress_config.json"
WEIGHTS = "model.safetensors"


@dataclass
class ScaleHeadConfig:
    method: ClassVar[str] = "scale_head"
    cli_flags: ClassVar[tuple[str, ...]] = ("scale",)

    scale: float = field(default=0.5, metadata={"help": "factor applied to the classifier weights"})
    center: bool = field(default=True, metadata={"help": "shift the bias by the mean calibration logit"})
    version: int = 1

    def __post_init__(self) -> None:
        check(self.scale > 0, f"`scale` must be positive, got {self.scale!r}")


@dataclass
class BrokenScaleHeadConfig(ScaleHeadConfig):
    method: ClassVar[str] = "scale_head_broken"


@torch.no_grad()
def apply_scale_head(model, config: ScaleHeadConfig, calib=None, *, filter_fn=None) -> None:
    model.head.weight.mul_(config.scale)
    if config.center and calib is not None:
        logits = torch.cat([model(x) for x in iter_inputs(calib)])
        model.head.bias.sub_(logits.mean(0))
    model.thrifty_compress = config_dict(config)


def save_scale_head(model, directory: str, *, backbone=None, extra=None) -> None:
    os.makedirs(directory, exist_ok=True)
    save_tensors(os.path.join(directory, WEIGHTS), dict(model.state_dict()))
    spec = backbone or model.backbone.spec
    meta = {"backbone": spec.replace(random_init=True, checkpoint=None).to_dict(), "num_classes": model.num_classes}
    write_json(os.path.join(directory, MANIFEST), {"config": model.thrifty_compress, "model": meta, "extra": extra})


def _rebuild(directory: str, method: str):
    from thrifty.backbones import load_backbone
    from thrifty.tuners import get_tuned_model, make_config

    info = read_json(os.path.join(directory, MANIFEST))
    config = info.get("config") if isinstance(info, dict) else None
    if not isinstance(config, dict) or config.get("method") != method:
        raise CheckpointError(f"{directory}: {MANIFEST} was not written by {method}")
    meta = info["model"]
    bb = load_backbone(BackboneSpec.from_dict(meta["backbone"]))
    return get_tuned_model(bb, make_config("full"), meta["num_classes"]), info


def load_scale_head(directory: str, device: str = "cpu") -> tuple[Any, dict[str, Any]]:
    model, info = _rebuild(directory, "scale_head")
    try:
        model.load_state_dict(load_tensors(os.path.join(directory, WEIGHTS)), strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{directory}: saved tensors do not fit ({exc})") from exc
    model.thrifty_compress = info["config"]
    return model.to(device).eval(), info


def load_forgetting_tensors(directory: str, device: str = "cpu") -> tuple[Any, dict[str, Any]]:
    model, info = _rebuild(directory, "scale_head_broken")
    load_tensors(os.path.join(directory, WEIGHTS))  # read (corrupt files still raise) but never applied
    return model.to(device).eval(), info


def register_dummy(broken: bool = False, **extra: Any):
    """Register the dummy (or its broken twin); returns its name. Unregister with unregister_compressor(name)."""
    cls = BrokenScaleHeadConfig if broken else ScaleHeadConfig
    load = load_forgetting_tensors if broken else load_scale_head
    register_compressor(cls, apply=apply_scale_head, save=save_scale_head, load=load, **extra)
    return cls.method
