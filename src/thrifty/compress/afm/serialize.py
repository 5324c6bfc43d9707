"""Save / load an `afm`-compressed model: `model.safetensors` (the whole state dict) + `compress_config.json` (config,
converted structure, summary, how to rebuild the architecture: BackboneSpec, CTR schema, tuner config).

    save_afm(model, "out/");  model, info = load_afm("out/")     (or thrifty.compress.load_compressed)
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from thrifty.backbones import Backbone, BackboneSpec, load_backbone
from thrifty.compress.afm.apply import apply_afm_, backbone_of
from thrifty.compress.afm.config import AFMConfig
from thrifty.errors import CheckpointError, ConfigError
from thrifty.io import load_tensors, read_json, save_tensors, write_json


MANIFEST = "compress_config.json"
WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1


def save_afm(model: nn.Module, directory: str, *, backbone: BackboneSpec | None = None, extra: dict | None = None):
    """Write a converted model (a TunedModel or a Backbone); records the architecture, not the original weights."""
    from thrifty.tuners.registry import model_record
    from thrifty.version import __version__

    record = getattr(model, "thrifty_compress", None)
    if not isinstance(record, dict) or record.get("config", {}).get("method") != AFMConfig.method:
        raise CheckpointError("save_afm needs a model converted by afm (compress_ with AFMConfig first)")
    bb, _ = backbone_of(model)
    if bb is None:
        raise CheckpointError("save_afm saves thrifty models (a TunedModel or a Backbone), not other modules")
    spec = backbone or bb.spec or BackboneSpec(bb.name)
    info = {
        "format_version": FORMAT_VERSION,
        "thrifty_version": __version__,
        "config": record["config"],
        "structure": record["structure"],
        "summary": record["summary"],
        "model": {
            **model_record(model),
            "backbone": spec.replace(random_init=True, checkpoint=None, token_file=None).to_dict(),
            "schema": bb.data_schema(),
        },
        "extra": extra or {},
    }
    os.makedirs(directory, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_tensors(os.path.join(directory, WEIGHTS), tensors, {"method": AFMConfig.method})
    write_json(os.path.join(directory, MANIFEST), info)


def load_afm(directory: str, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the architecture, the factorized structure, then load the saved tensors (strict)."""
    from thrifty.tuners.registry import load_frozen_, model_from_record

    info = read_json(os.path.join(directory, MANIFEST))
    if not isinstance(info, dict) or info.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{directory}: {MANIFEST} is not an afm model of format {FORMAT_VERSION}")
    try:
        if info["config"]["method"] != AFMConfig.method:
            raise CheckpointError(f"{directory} was written by {info['config']['method']!r}, not afm")
        config = AFMConfig.from_dict(info["config"]).replace(step="prepare_for_loading")
        meta, structure = info["model"], info["structure"]
        bb: Backbone = load_backbone(BackboneSpec.from_dict(meta["backbone"]))
    except (KeyError, TypeError, ValueError, ConfigError) as exc:
        raise CheckpointError(f"{directory}: {MANIFEST} is not an afm model's manifest ({exc})") from exc
    if meta.get("schema"):
        bb.build_from_schema_(meta["schema"])
    model = model_from_record(bb, meta)
    try:
        apply_afm_(model, config, spec=structure)
    except ConfigError as exc:
        raise CheckpointError(f"{directory}: {exc}") from exc
    tensors = load_tensors(os.path.join(directory, WEIGHTS))
    load_frozen_(model, tensors, directory)
    object.__setattr__(model, "thrifty_compress", {k: info[k] for k in ("config", "structure", "summary")})
    return model.to(device).eval(), info
