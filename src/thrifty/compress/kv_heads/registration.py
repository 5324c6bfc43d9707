"""`kv_heads` on the compressor registry: `compress_(model, KVHeadsConfig(...), calib)` and
`thrifty compress --method kv_heads --kv-heads K [--heal-steps N --heal-lr LR]`.

The CLI compresses the backbone as a causal LM (a decoder: `smollm2`, `hf:<causal LM dir>`; calibration and
healing text from the data's training split, perplexity on its test split) or, with `--adapter`, the fine-tuned
classifier (an encoder such as `minilm`; LoRA merged first). Healing (`heal_steps` > 0) runs thrifty's Trainer on
the calibration batches with the model's own objective (`causal_lm` for a decoder; the classifier's loss on the
calibration samples' labels for `--adapter`), LoRA on the attention projections, merged back before saving. A
classifier's head is saved next to the stock HF folder (head.safetensors) so that `load` rebuilds it.
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


HEAL_CHECK_SAMPLES = 16  # calibration samples evaluated after healing (recipe["calibration_*_after"])


def heal_with_trainer(model: nn.Module, batches: list[Any] | None, config: KVHeadsConfig) -> dict[str, Any]:
    """LoRA-heal `model` (a TunedModel) with its own objective for about `heal_steps` steps of `heal_batch_size`
    calibration samples: next-token loss for a causal LM (labels ignored), the classifier's loss on the batches'
    labels otherwise (`(inputs, labels)` pairs, as `thrifty compress` draws them from the training split). Returns
    the recipe (recorded in compression.json), with the objective's metrics on the first HEAL_CHECK_SAMPLES
    calibration samples after healing (an in-sample sanity check, kept small: the held-out evaluation is the
    caller's)."""
    from thrifty.compress.calibration import batch_inputs
    from thrifty.data.base import TaskData, TensorDictDataset
    from thrifty.train import TrainConfig, Trainer

    objective = getattr(model, "objective", None)
    if objective is None or not batches:
        raise ConfigError(
            "healing through thrifty trains a TunedModel (a causal LM, or a classifier with labelled calibration "
            "batches, as `thrifty compress` builds them) on calibration batches; otherwise call heal_(model, train)"
        )
    inputs = [batch_inputs(b) for b in batches]
    if not all(isinstance(x, dict) for x in inputs):
        raise ConfigError("healing needs tokenized calibration batches (dicts of input_ids / attention_mask)")
    tokens = {k: torch.cat([x[k] for x in inputs]) for k in inputs[0] if isinstance(inputs[0][k], torch.Tensor)}
    labels, num_classes = None, None
    if objective != "causal_lm":
        if not all(isinstance(b, (tuple, list)) and len(b) == 2 for b in batches):
            raise ConfigError(
                f"healing a {objective} model needs labelled calibration batches ((inputs, labels) pairs from the "
                "training split); these have no labels"
            )
        labels = torch.cat([torch.as_tensor(b[1]).reshape(-1) for b in batches]).tolist()
        num_classes = getattr(model, "num_classes", None)
    data = TensorDictDataset(tokens, labels, source="kv_heads calibration")
    check = data.subset(range(min(len(data), HEAL_CHECK_SAMPLES)))  # the after-healing check: cheap, in-sample
    task = TaskData("calibration", {"train": data, "test": check}, num_classes, objective=objective)
    bs = min(config.heal_batch_size, len(data))
    epochs = max(1, math.ceil(config.heal_steps * bs / len(data)))
    train = TrainConfig(epochs=epochs, batch_size=bs, lr=config.heal_lr, warmup_epochs=0.0, progress=True)
    fit = heal_(model, lambda m: Trainer(m, task, train, objective=objective).fit(), r=config.heal_r)
    history = fit.get("history") or [{}]
    recipe = {
        "objective": objective,
        "steps": epochs * math.ceil(len(data) / bs),
        "epochs": epochs,
        "batch_size": bs,
        "lr": config.heal_lr,
        "lora_r": config.heal_r,
        "sequences": len(data),
        "checked_samples": len(check),
        "train_loss_first_epoch": history[0].get("train_loss"),
        "train_loss_last_epoch": history[-1].get("train_loss"),
    }
    recipe.update({f"calibration_{k[5:]}_after": v for k, v in fit.items() if k.startswith("test_")})
    return recipe


HEAD_FILE = "head.safetensors"  # the classifier of a fine-tuned encoder (--adapter), outside the HF folder's model


def _classifier_head(model: nn.Module) -> nn.Module | None:
    """The fine-tuned head of a TunedModel classifier (None for a causal LM, whose head is the model's own)."""
    head = getattr(model, "head", None)
    if head is None or getattr(model, "objective", None) in (None, "causal_lm"):
        return None
    return head


def save(model: nn.Module, directory: str, *, backbone=None, extra: dict[str, Any] | None = None) -> None:
    """A stock Hugging Face folder (transformers loads it without thrifty) + compression.json; a fine-tuned
    classifier's head goes to head.safetensors (compression.json["head"]), and the text backbone's max_length to
    compression.json["backbone"], so that `load` rebuilds the same model."""
    meta: dict[str, Any] = {"extra": extra or {}}
    tensors = {}
    head = _classifier_head(model)
    if head is not None:
        tensors[HEAD_FILE] = {k: v.detach().contiguous() for k, v in head.state_dict().items()}
        meta["head"] = {"file": HEAD_FILE, "num_classes": model.num_classes, "objective": model.objective}
    bb = getattr(model, "backbone", model)
    max_length = getattr(getattr(bb, "preprocess", None), "max_length", None)
    if max_length is not None:
        meta["backbone"] = {"name": getattr(bb, "name", None), "max_length": int(max_length)}
    save_compressed(model, directory, extra=meta, tensors=tensors, overwrite=True)


def load(directory: str, device: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """A saved folder as thrifty models: a decoder as a causal LM (TunedModel, causal_lm objective), a fine-tuned
    encoder as its classifier (TunedModel with the saved head), a bare encoder as its Backbone; with
    compression.json. Stock transformers loads the same folder (`save_compressed`)."""
    import os

    from safetensors import SafetensorError

    from thrifty.backbones import BackboneSpec, load_backbone
    from thrifty.errors import CheckpointError, SpecError
    from thrifty.io import load_tensors, read_json

    path = os.path.join(directory, COMPRESSION_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{directory} has no {COMPRESSION_FILE}; it was not written by kv_heads")
    report = read_json(path)
    if not isinstance(report, dict) or (report.get("config") or {}).get("method") != KVHeadsConfig.method:
        raise CheckpointError(f"{path} does not describe a kv_heads model")
    for name in sorted(os.listdir(directory)):  # transformers skips a broken generation config without a word
        if name.endswith(".json"):
            read_json(os.path.join(directory, name))  # CheckpointError naming the file
    head_meta = report.get("head")
    max_length = (report.get("backbone") or {}).get("max_length")
    try:
        bb = load_backbone(BackboneSpec(f"hf:{os.path.abspath(directory)}", max_length=max_length))
        head_state = load_tensors(os.path.join(directory, head_meta["file"])) if head_meta else None
    except (SpecError, OSError, ValueError, RuntimeError, SafetensorError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{directory}: the saved model does not load ({exc!r}); it may be truncated") from exc
    if head_meta:
        from thrifty.tuners import get_tuned_model, make_config

        model = get_tuned_model(
            bb, make_config("full"), head_meta.get("num_classes"), objective=head_meta.get("objective")
        )
        try:
            model.head.load_state_dict(head_state, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{directory}/{head_meta['file']} does not fit the classifier ({exc})") from exc
        for p in model.parameters():
            p.requires_grad_(False)
    elif getattr(bb, "lm_head", None) is not None:
        model = cli_model(bb, None, None)
    else:
        model = bb
    return model.to(device).eval(), report


def cli_model(backbone: nn.Module, task: Any, adapter: str | None) -> nn.Module:
    """`--adapter DIR`: the fine-tuned model of DIR (a LoRA adapter merged into the weights first, so that the
    attention projections are plain Linears); otherwise the backbone as a causal LM (its own LM head)."""
    from thrifty.tuners import get_tuned_model, load_tuned_model, make_config

    if adapter:
        model = load_tuned_model(backbone, adapter)
        return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
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
