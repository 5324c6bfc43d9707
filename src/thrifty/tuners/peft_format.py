"""PEFT-native LoRA directories: written so that stock `peft` loads them, and read back from stock `peft` output.

A LoRA model saves (`TunedModel.save_pretrained`, `thrifty train --method lora`):

    adapter_config.json        PEFT's LoraConfig and nothing else (`peft_type: "LORA"`, r, lora_alpha, lora_dropout,
                               target_modules, exclude_modules, layers_to_transform, layers_pattern, modules_to_save,
                               bias, ...), so `PeftConfig.from_pretrained` builds it without an "Unexpected keyword
                               arguments" warning (PEFT warns on every key its LoraConfig lacks)
    adapter_model.safetensors  PEFT's keys: `base_model.model.<module>.lora_A.weight` / `.lora_B.weight`, plus the head
                               as PEFT's `modules_to_save` (`base_model.model.head.weight` / `.bias`, config
                               `modules_to_save: ["head"]`) where the backbone has an upstream head slot
    thrifty_head.safetensors   the head under thrifty's names (`head.weight`, `head.bias`) where it has none
    thrifty_config.json        thrifty's own keys: method, num_classes, backbone spec, weight hash, versions

Where the head goes (`Backbone.upstream_head_name()`):
- timm ViT: thrifty builds the model with `num_classes=0`, which empties timm's `head` slot; TunedModel computes
  `head(forward_head(forward_features(x), pre_logits=True))`, exactly what `timm.create_model(name, num_classes=C)`
  computes with a Linear in that slot. So the head is PEFT's `modules_to_save` and
  `PeftModel.from_pretrained(timm.create_model(name, num_classes=C), dir)` gives thrifty's logits.
- Hugging Face encoders (`hf:`, `minilm`): thrifty pools an attention-mask-weighted mean of the last hidden states;
  no transformers class has that pooling plus a Linear, and BertModel has no module a `modules_to_save` entry could
  name, so the head goes to `thrifty_head.safetensors`. `PeftModel.from_pretrained(AutoModel.from_pretrained(src,
  add_pooling_layer=False), dir)` gives thrifty's hidden states; logits = mean-pool + that Linear (docs/methods.md).
- A head that is not a plain Linear(num_features, C) also goes to `thrifty_head.safetensors`.

Targets: the config keeps the user's rules when PEFT's matching (`peft_selects`, a port of peft 0.21's
`check_target_module_exists`) picks exactly the modules thrifty wrapped; otherwise (`"all-linear"`, a regex with
`layers_to_transform`, rules the two libraries read differently) it lists the wrapped modules by name.

Reading a PEFT directory (`TunedModel.from_pretrained`): options thrifty does not implement (DoRA, rsLoRA,
rank/alpha patterns, bias training, initialisations that rewrite the base weights, ...) raise CheckpointError; the
wrapped modules are read from the weight keys; `modules_to_save` must be the backbone's head slot.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from thrifty.errors import CheckpointError, NoMatchingModuleError
from thrifty.io import load_tensors, read_json, save_tensors, write_json
from thrifty.tuners.base import CONFIG_NAME, PREFIX, WEIGHTS_NAME
from thrifty.tuners.targeting import find_targets


THRIFTY_CONFIG_NAME = "thrifty_config.json"
HEAD_WEIGHTS_NAME = "thrifty_head.safetensors"
PEFT_BIN_NAME = "adapter_model.bin"  # peft's `safe_serialization=False`

# thrifty LoraConfig fields that PEFT's LoraConfig has under the same name and meaning
SHARED_KEYS = (
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "inference_mode",
)
# PEFT options thrifty implements at one value only; written with it, refused on load at any other
FIXED = {
    "bias": ("none", "training base-layer biases"),
    "fan_in_fan_out": (False, "Conv1D (GPT-2 style) weights"),
    "use_rslora": (False, "rank-stabilised scaling alpha / sqrt(r)"),
    "use_dora": (False, "DoRA"),
    "lora_bias": (False, "a bias on lora_B"),
    "rank_pattern": ({}, "per-module ranks"),
    "alpha_pattern": ({}, "per-module alphas"),
}
# PEFT keys that do not change the saved model's function (bookkeeping, initialisation-only sub-configs)
IGNORED = {
    "peft_type",
    "task_type",
    "auto_mapping",
    "base_model_name_or_path",
    "revision",
    "peft_version",
    "modules_to_save",
    "init_lora_weights",
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "qalora_group_size",
    "megatron_core",
    "runtime_config",
    "ensure_weight_tying",
}
# initialisations that leave the base weights alone (PiSSA, OLoRA, LoftQ, CorDA, LoRA-GA rewrite them; MiCA is a
# layer variant): a file saved after any of these loads on the unmodified upstream model
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


# --- PEFT's target matching ------------------------------------------------------------------------------------------
def _peft_layer_index(key: str, layers_pattern: str | Sequence[str] | None) -> int | None:
    if not layers_pattern:  # peft: the first numbered segment after at least one name
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        match = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def peft_selects(
    names: Iterable[str],
    target_modules: str | Sequence[str],
    exclude_modules: str | Sequence[str] | None = None,
    layers_to_transform: int | Sequence[int] | None = None,
    layers_pattern: str | Sequence[str] | None = None,
    modules_to_save: Sequence[str] | None = None,
) -> list[str]:
    """Module names PEFT would wrap, by name only (port of peft 0.21 `check_target_module_exists`): exclusions
    first, never inside `modules_to_save`, a str is `re.fullmatch`, a list matches exact names or `.suffix`es and only
    a suffix match is filtered by `layers_to_transform`."""
    out = []
    for key in names:
        if not key:
            continue
        if exclude_modules:
            if isinstance(exclude_modules, str):
                if re.fullmatch(exclude_modules, key):
                    continue
            elif key in exclude_modules or any(key.endswith(f".{e}") for e in exclude_modules):
                continue
        if modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in modules_to_save):
            continue
        if isinstance(target_modules, str):
            hit = re.fullmatch(target_modules, key) is not None
        elif key in target_modules:
            hit = True
        else:
            hit = any(key.endswith(f".{t}") for t in target_modules)
            layers = layers_to_transform
            if hit and layers is not None and (not isinstance(layers, list) or layers):
                idx = _peft_layer_index(key, layers_pattern)
                hit = idx is not None and (idx == layers if isinstance(layers, int) else idx in layers)
        if hit:
            out.append(key)
    return out


# --- writing ---------------------------------------------------------------------------------------------------------
def head_slot(model) -> str | None:
    """The upstream module name the head is saved under (PEFT `modules_to_save`), or None (own file)."""
    slot = model.backbone.upstream_head_name()
    head = model.head
    if slot is None or type(head) is not nn.Linear or head.in_features != model.backbone.num_features:
        return None
    return slot


def _upstream_names(model) -> list[str]:
    """Module names of the upstream model as PEFT sees it before injection (LoRA wrappers' insides left out)."""
    wrapped = tuple(f"{n}." for n in model.targeted_module_names)
    return [n for n, _ in model.backbone.model.named_modules() if n and not n.startswith(wrapped)]


def peft_target_rules(model, slot: str | None) -> dict[str, Any]:
    """target_modules / exclude_modules / layers_to_transform / layers_pattern for which PEFT wraps exactly
    `model.targeted_module_names`: the config's rules when PEFT reads them the same way, else the names."""
    cfg = model.config
    targets = cfg.target_modules if cfg.target_modules is not None else model.backbone.default_target_modules()
    rules: dict[str, Any] = {
        "target_modules": targets,
        "exclude_modules": cfg.exclude_modules,
        "layers_to_transform": cfg.layers_to_transform,
        "layers_pattern": cfg.layers_pattern,
    }
    if isinstance(targets, str):  # peft refuses layers_* with a regex
        rules["layers_to_transform"] = None
    if rules["layers_to_transform"] is None:  # peft refuses layers_pattern alone
        rules["layers_pattern"] = None
    wanted = set(model.targeted_module_names)
    names = _upstream_names(model)
    save = [slot] if slot else None
    if targets == "all-linear" or set(peft_selects(names, **rules, modules_to_save=save)) != wanted:
        explicit = list(model.targeted_module_names)
        rules = {"target_modules": explicit, "exclude_modules": None, "layers_to_transform": None}
        rules["layers_pattern"] = None
        if set(peft_selects(names, explicit, modules_to_save=save)) != wanted:  # a name that is another's suffix
            rules["target_modules"] = "|".join(re.escape(n) for n in explicit)
    if isinstance(rules["target_modules"], (list, tuple)):
        rules["target_modules"] = sorted(set(rules["target_modules"]))
    return rules


def write_lora_dir(model, directory: str, cfg: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    """Write `model` (thrifty config dict `cfg`, tensors `state` under thrifty's file keys) as a PEFT directory."""
    upstream = model.backbone.model
    slot = head_slot(model) if any(k.startswith("head.") for k in state) else None
    peft_state, rest = {}, {}
    for key, value in state.items():
        if key.startswith(PREFIX):
            peft_state[key] = value
        elif slot is not None and key.startswith("head."):
            peft_state[f"{PREFIX}{slot}.{key[len('head.') :]}"] = value
        else:
            rest[key] = value
    alpha = float(cfg["lora_alpha"])
    peft_cfg: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": None,
        "auto_mapping": {"base_model_class": type(upstream).__name__, "parent_library": type(upstream).__module__},
        "base_model_name_or_path": upstream.__dict__.get("name_or_path") or None,  # what peft records
        "revision": None,
        "inference_mode": True,
        "r": int(cfg["r"]),
        "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
        "lora_dropout": float(cfg["lora_dropout"]),
        **peft_target_rules(model, slot),
        "modules_to_save": [slot] if slot is not None else None,
        "init_lora_weights": True,
        **{k: v for k, (v, _) in FIXED.items()},
    }
    thrifty_cfg = {k: v for k, v in cfg.items() if k not in SHARED_KEYS and k != "base_model_name_or_path"}
    thrifty_cfg["backbone"] = cfg.get("base_model_name_or_path")
    meta = {"method": str(cfg.get("method", "lora")), "backbone": str(thrifty_cfg["backbone"])}
    os.makedirs(directory, exist_ok=True)
    save_tensors(os.path.join(directory, WEIGHTS_NAME), peft_state, meta)
    head_path = os.path.join(directory, HEAD_WEIGHTS_NAME)
    if rest:
        save_tensors(head_path, rest, meta)
    elif os.path.exists(head_path):  # a stale head file from an earlier save would be loaded on top
        os.remove(head_path)
    write_json(os.path.join(directory, THRIFTY_CONFIG_NAME), thrifty_cfg)
    write_json(os.path.join(directory, CONFIG_NAME), peft_cfg)


# --- reading ---------------------------------------------------------------------------------------------------------
def check_supported(peft_cfg: dict[str, Any], directory: str) -> None:
    """Refuse PEFT options that change the function thrifty's LoRA computes."""
    kind = peft_cfg.get("peft_type")
    if kind != "LORA":
        raise CheckpointError(
            f"{directory} holds a PEFT {kind} adapter; thrifty loads PEFT LoRA adapters (peft_type LORA) only. "
            "Load it with peft, or train the method with thrifty"
        )
    for key, value in peft_cfg.items():
        if key in SHARED_KEYS or key in IGNORED:
            continue
        if key in FIXED:
            neutral, what = FIXED[key]
            ok = value == neutral or (neutral == {} and value is None)
        else:  # options of other/newer peft versions: only an unset value is safe to ignore
            what, ok = "an option thrifty does not know", value in (None, False, {}, [], "", "none")
        if not ok:
            raise CheckpointError(
                f"{directory}: PEFT option {key}={value!r} ({what}) is not implemented by thrifty's lora; "
                f"load this adapter with peft, or save one trained without {key}"
            )
    init = peft_cfg.get("init_lora_weights", True)
    if init not in PLAIN_INITS:
        raise CheckpointError(
            f"{directory}: init_lora_weights={init!r} rewrites the base weights (or is a layer variant), so the "
            "adapter does not fit the unmodified backbone; save it with peft's "
            "path_initial_model_for_weight_conversion, which converts it to a plain LoRA"
        )
    if peft_cfg.get("target_modules") is None:
        raise CheckpointError(f"{directory}: adapter_config.json has no target_modules")
    if len(peft_cfg.get("modules_to_save") or []) > 1:
        raise CheckpointError(
            f"{directory}: modules_to_save={peft_cfg['modules_to_save']}; thrifty trains only the classification "
            "head besides the LoRA weights, so it can hold one module there (the head)"
        )


def _peft_tensors(directory: str) -> dict[str, torch.Tensor]:
    path = os.path.join(directory, WEIGHTS_NAME)
    if os.path.isfile(path) or not os.path.isfile(os.path.join(directory, PEFT_BIN_NAME)):
        return load_tensors(path)
    try:  # a foreign format: peft's pickle, read without code execution
        return torch.load(os.path.join(directory, PEFT_BIN_NAME), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{directory}/{PEFT_BIN_NAME} is not a readable tensor file ({exc})") from exc


def read_peft_dir(directory: str, peft_cfg: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(thrifty config dict, tensors under thrifty's file keys) from a PEFT LoRA directory (thrifty's or stock
    peft's). The head comes from `modules_to_save` or thrifty_head.safetensors."""
    check_supported(peft_cfg, directory)
    sidecar_path = os.path.join(directory, THRIFTY_CONFIG_NAME)
    sidecar = read_json(sidecar_path) if os.path.isfile(sidecar_path) else {}
    state = _peft_tensors(directory)
    saved = peft_cfg.get("modules_to_save") or []
    if saved:
        prefix = f"{PREFIX}{saved[0]}."
        for key in [k for k in state if k.startswith(prefix)]:
            state[f"head.{key[len(prefix) :]}"] = state.pop(key)
    head_path = os.path.join(directory, HEAD_WEIGHTS_NAME)
    if os.path.isfile(head_path):
        state.update(load_tensors(head_path))
    cfg: dict[str, Any] = {"method": "lora"}
    cfg.update((k, v) for k, v in sidecar.items() if k != "backbone")
    if sidecar.get("backbone"):
        cfg["base_model_name_or_path"] = sidecar["backbone"]
    cfg.update((k, peft_cfg[k]) for k in SHARED_KEYS if k in peft_cfg)
    cfg["lora_alpha"] = float(cfg.get("lora_alpha", 8))
    if isinstance(cfg.get("layers_to_transform"), int):
        cfg["layers_to_transform"] = [cfg["layers_to_transform"]]
    if "num_classes" not in cfg and "head.weight" in state:
        cfg["num_classes"] = int(state["head.weight"].shape[0])
    return cfg, state


def fit_to_backbone(
    cfg: dict[str, Any], peft_cfg: dict[str, Any], state: dict[str, torch.Tensor], backbone, directory: str
) -> dict[str, Any]:
    """Check the head slot and the wrapped modules against `backbone`; where thrifty's targeting rules would pick
    other modules than the file's weights name, target those modules by name."""
    saved = peft_cfg.get("modules_to_save") or []
    slot = backbone.upstream_head_name()
    if saved and saved != [slot]:
        where = f"its head slot is {slot!r}" if slot else "it has no upstream head slot"
        raise CheckpointError(
            f"{directory}: modules_to_save={saved} is not the classification head of {backbone.name} ({where}); "
            "thrifty trains only the head besides the LoRA weights"
        )
    if "num_classes" not in cfg:
        fix = (
            f"wrap the upstream model with LoraConfig(modules_to_save=[{slot!r}]) before training and saving with peft"
            if slot
            else f"{backbone.name} has no upstream head slot, so put the head in {HEAD_WEIGHTS_NAME} "
            "(keys head.weight, head.bias)"
        )
        raise CheckpointError(
            f"{directory} holds no classification head, which thrifty needs to rebuild the model; {fix}"
        )
    foreign = [k for k in state if k.startswith(PREFIX) and not k.endswith(LORA_SUFFIXES)]
    if foreign:
        raise CheckpointError(
            f"{directory} holds {foreign[:3]}: LoRA weights of a kind thrifty does not implement (it wraps nn.Linear "
            "and nn.Conv2d with lora_A/lora_B only)"
        )
    a_suffix = LORA_SUFFIXES[0]
    wrapped = {k[len(PREFIX) : -len(a_suffix)] for k in state if k.startswith(PREFIX) and k.endswith(a_suffix)}
    if not wrapped:
        raise CheckpointError(f"{directory}/{WEIGHTS_NAME} holds no LoRA weights (no `*.lora_A.weight` keys)")
    modules = dict(backbone.model.named_modules())
    for name in sorted(wrapped):
        if not isinstance(modules.get(name), (nn.Linear, nn.Conv2d)):
            found = type(modules[name]).__name__ if name in modules else "no such module"
            raise CheckpointError(
                f"{directory} has LoRA weights for {name!r} ({found} in {backbone.name}); thrifty's lora wraps "
                "nn.Linear and nn.Conv2d modules of the same upstream model"
            )
    try:
        ours = (
            None
            if cfg.get("target_modules") is None
            else find_targets(
                backbone.model,
                cfg["target_modules"],
                exclude_modules=cfg.get("exclude_modules"),
                layers_to_transform=cfg.get("layers_to_transform"),
                layers_pattern=cfg.get("layers_pattern"),
                types=(nn.Linear, nn.Conv2d),
            )
        )
    except NoMatchingModuleError:
        ours = None
    if ours is None or set(ours) != wrapped:
        names = [n for n in modules if n in wrapped]  # module order
        cfg = {**cfg, "target_modules": names, "exclude_modules": None, "layers_to_transform": None}
        cfg["layers_pattern"] = None
    return cfg
