"""`kv_heads` on the compressor registry: `compress_(model, KVHeadsConfig(...), calib)` and
`thrifty compress --method kv_heads --kv-heads K [--heal-steps N --heal-lr LR]`.

The CLI compresses the backbone as a causal LM (a decoder: `smollm2`, `hf:<causal LM dir>`; calibration and
healing text from the data's training split, perplexity on its test split) or, with `--adapter`, the fine-tuned
classifier (an encoder such as `minilm`). Healing (`heal_steps` > 0) runs thrifty's Trainer with the `causal_lm`
objective on the calibration batches, LoRA on the attention projections, merged back before saving.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from thrifty.compress.kv_heads.api import compress_kv_heads_, kv_heads_report
from thrifty.compress.kv_heads.config import KVHeadsConfig
from thrifty.compress.kv_heads.heal import heal_
from thrifty.compress.kv_heads.save import COMPRESSION_FILE, save_compressed
from thrifty.compress.registry import register_compressor
from thrifty.errors import ConfigError


def apply_kv_heads_(model: nn.Module, config: KVHeadsConfig, calib: Any = None, *, filter_fn=None, **kw) -> None:
    """Compress in place; then, with `config.heal_steps`, heal on the calibration batches (see heal_with_trainer)."""
    batches = list(calib) if calib is not None else None  # read twice when healing
    compress_kv_heads_(model, config, batches, **kw)
    if config.heal_steps:
        recipe = heal_with_trainer(model, batches, config)
        kv_heads_report(model)["heal"] = recipe


def heal_with_trainer(model: nn.Module, batches: list[Any] | None, config: KVHeadsConfig) -> dict[str, Any]:
    """LoRA-heal `model` (a TunedModel with the causal_lm objective) for about `heal_steps` steps of
    `heal_batch_size` sequences of the calibration text; returns the recipe (recorded in compression.json)."""
    from thrifty.compress.calibration import batch_inputs
    from thrifty.data.base import TaskData, TensorDictDataset
    from thrifty.train import TrainConfig, Trainer

    if getattr(model, "objective", None) != "causal_lm" or not batches:
        raise ConfigError(
            "healing through thrifty trains a causal LM (a TunedModel with the causal_lm objective, as `thrifty "
            "compress` builds for decoders) on calibration batches; otherwise call heal_(model, train) yourself"
        )
    inputs = [batch_inputs(b) for b in batches]
    tokens = {k: torch.cat([x[k] for x in inputs]) for k in ("input_ids", "attention_mask")}
    data = TensorDictDataset(tokens, source="kv_heads calibration")
    task = TaskData("calibration", {"train": data, "test": data}, None, objective="causal_lm")
    bs = min(config.heal_batch_size, len(data))
    epochs = max(1, math.ceil(config.heal_steps * bs / len(data)))
    train = TrainConfig(epochs=epochs, batch_size=bs, lr=config.heal_lr, warmup_epochs=0.0, progress=False)
    fit = heal_(model, lambda m: Trainer(m, task, train, objective="causal_lm").fit(), r=config.heal_r)
    return {
        "steps": epochs * math.ceil(len(data) / bs),
        "epochs": epochs,
        "batch_size": bs,
        "lr": config.heal_lr,
        "lora_r": config.heal_r,
        "sequences": len(data),
        "calibration_perplexity_after": fit.get("test_perplexity"),
    }


def save(model: nn.Module, directory: str, *, backbone=None, extra: dict[str, Any] | None = None) -> None:
    """A stock Hugging Face folder (transformers loads it without thrifty) + compression.json."""
    save_compressed(model, directory, extra={"extra": extra or {}}, overwrite=True)


def load(directory: str, device: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """A saved folder as thrifty models: a decoder as a causal LM (TunedModel, causal_lm objective), an encoder as
    its Backbone; with compression.json. Stock transformers loads the same folder (`save_compressed`)."""
    import os

    from safetensors import SafetensorError

    from thrifty.backbones import BackboneSpec, load_backbone
    from thrifty.errors import CheckpointError, SpecError
    from thrifty.io import read_json

    path = os.path.join(directory, COMPRESSION_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{directory} has no {COMPRESSION_FILE}; it was not written by kv_heads")
    report = read_json(path)
    if not isinstance(report, dict) or (report.get("config") or {}).get("method") != KVHeadsConfig.method:
        raise CheckpointError(f"{path} does not describe a kv_heads model")
    for name in sorted(os.listdir(directory)):  # transformers skips a broken generation config without a word
        if name.endswith(".json"):
            read_json(os.path.join(directory, name))  # CheckpointError naming the file
    try:
        bb = load_backbone(BackboneSpec(f"hf:{os.path.abspath(directory)}"))
    except (SpecError, OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise CheckpointError(f"{directory}: the saved model does not load ({exc}); it may be truncated") from exc
    model = cli_model(bb, None, None) if getattr(bb, "lm_head", None) is not None else bb
    return model.to(device).eval(), report


def cli_model(backbone: nn.Module, task: Any, adapter: str | None) -> nn.Module:
    """`--adapter DIR`: the fine-tuned model of DIR; otherwise the backbone as a causal LM (its own LM head)."""
    from thrifty.tuners import get_tuned_model, load_tuned_model, make_config

    if adapter:
        return load_tuned_model(backbone, adapter)
    if getattr(backbone, "lm_head", None) is None:
        raise ConfigError(f"{backbone.name} has no LM head: compress a decoder, or pass --adapter (a classifier)")
    model = get_tuned_model(backbone, make_config("full"), None, objective="causal_lm")
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def summarize(model: nn.Module) -> dict[str, Any]:
    report = kv_heads_report(model) or {}
    errors = [{"k": layer.get("k_rel_err"), "v": layer.get("v_rel_err")} for layer in report.get("layers", [])]
    return {k: report.get(k) for k in ("kv_heads_before", "kv_heads_after", "heal")} | {"layer_rel_errors": errors}


register_compressor(
    KVHeadsConfig,
    apply=apply_kv_heads_,
    save=save,
    load=load,
    manifest=COMPRESSION_FILE,
    config_key="config",
    summarize=summarize,
    cli_model=cli_model,
)
