"""PEFT's `target_modules` rules: a list matches exact names or `.suffix`es, a str is a `re.fullmatch` regex,
`"all-linear"` picks every nn.Linear; `exclude_modules` takes the same forms; `layers_to_transform` +
`layers_pattern` keep only some block indices."""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from thrifty.errors import NoMatchingModuleError


def _matches(key: str, spec: str | Sequence[str]) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, key) is not None
    return key in spec or any(key.endswith(f".{t}") for t in spec)


def _layer_index(key: str, pattern: str | Sequence[str] | None) -> int | None:
    patterns = [pattern] if isinstance(pattern, str) else list(pattern or ["blocks", "layer", "layers", "h"])
    for p in patterns:
        m = re.match(rf".*\.{p}\.(\d+)\.", f".{key}.") or re.match(rf"^{p}\.(\d+)\.", f"{key}.")
        if m:
            return int(m.group(1))
    return None


def find_targets(
    model: nn.Module,
    target_modules: str | Sequence[str],
    *,
    exclude_modules=None,
    layers_to_transform: int | Sequence[int] | None = None,
    layers_pattern=None,
    types: tuple[type[nn.Module], ...] = (nn.Linear,),
) -> list[str]:
    """Names of the modules of `types` selected by PEFT's rules; raises NoMatchingModuleError if none."""
    layers = [layers_to_transform] if isinstance(layers_to_transform, int) else layers_to_transform
    found = []
    for key, module in model.named_modules():
        if not key or not isinstance(module, types):
            continue
        hit = isinstance(module, nn.Linear) if target_modules == "all-linear" else _matches(key, target_modules)
        if not hit or (exclude_modules and _matches(key, exclude_modules)):
            continue
        if layers is not None and _layer_index(key, layers_pattern) not in layers:
            continue
        found.append(key)
    if not found:
        raise NoMatchingModuleError(
            f"Target modules {target_modules} not found in the base model. Please check the "
            "target modules and try again (names are relative to the upstream model, e.g. "
            "'qkv' for timm ViT, 'query'/'value' for BERT)."
        )
    return found


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)
