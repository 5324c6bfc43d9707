"""MACs counted with `torch.utils.flop_counter` on the real model (one forward at batch 1), never a hand formula.

Two conventions (`DCViTConfig.macs`):
- `torch`: every matmul and convolution torch's counter knows, attention scores included (`q kᵀ` and `attn v`).
  On CPU, torch's counter has no formula for `aten._scaled_dot_product_flash_attention_for_cpu`, so its SDPA
  would silently count zero; we register torch's own SDPA formula for it (CPU and meta counts then agree).
- `thop`: what the reference's `thop` profile counts (spec §3.2, `src/thop/profile.py`): hooks on leaf modules
  only, so Linear and Conv MACs and a LayerNorm as 4 x numel (2 x numel, doubled when affine); functional ops such
  as the attention score matmuls are NOT counted. We count with torch's counter and keep only what falls inside
  leaf Linear / Conv / LayerNorm modules. With it the structure formula reproduces the reference's figures on
  ViT-B/16 (4 blocks at MLP ratio 1.4987 for keep = 0.751734186; see tests/test_dc_vit.py).
MACs = FLOPs / 2 for the matmul formulas.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from thrifty.errors import ConfigError


aten = torch.ops.aten
_SDPA_CPU = [aten._scaled_dot_product_flash_attention_for_cpu]


def _sdpa_cpu(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _layer_norm_thop(input_shape, normalized_shape, weight_shape=None, *args, out_shape=None, **kwargs) -> int:
    numel = 1
    for s in input_shape:
        numel *= int(s)
    macs = 2 * numel * (2 if weight_shape is not None else 1)  # thop's count_normalization
    return 2 * macs  # in FLOPs: the counter's total is halved into MACs


def _mapping(convention: str) -> dict[Any, Any]:
    if convention not in ("torch", "thop"):
        raise ConfigError(f"unknown MAC convention {convention!r}; use torch or thop")
    mapping: dict[Any, Any] = {op: _sdpa_cpu for op in _SDPA_CPU}
    if convention == "thop":
        mapping[aten.native_layer_norm] = _layer_norm_thop
    return mapping


_THOP_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.LayerNorm)


def _thop_view(root: nn.Module, raw: dict[str, int]) -> dict[str, int]:
    """thop's module-hook view of per-module counts: only leaf Linear / Conv / LayerNorm modules count, and a
    module's MACs are those of such leaves inside it (functional ops such as attention matmuls drop out)."""
    leaves = {n: raw.get(n, 0) for n, m in root.named_modules() if isinstance(m, _THOP_MODULES)}
    out = {}
    for name in raw:
        prefix = name + "." if name else ""
        out[name] = sum(v for leaf, v in leaves.items() if leaf == name or leaf.startswith(prefix))
    return out


def _to(inputs: Any, device: torch.device) -> Any:
    if isinstance(inputs, dict):
        return {k: v.to(device) for k, v in inputs.items()}
    return inputs.to(device)


@torch.no_grad()
def count_macs(model: nn.Module, inputs: Any, convention: str = "torch") -> tuple[int, dict[str, int]]:
    """(total MACs, MACs per module name relative to `model`) of `model(inputs)` under `convention`."""
    counter = FlopCounterMode(display=False, custom_mapping=_mapping(convention))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with counter:
            model(_to(inputs, device))
    finally:
        model.train(was_training)
    root = type(model).__name__
    per_module = {}
    for key, ops in counter.get_flop_counts().items():
        if key == root:
            name = ""
        elif key.startswith(root + "."):
            name = key[len(root) + 1 :]
        else:
            continue
        per_module[name] = sum(int(v) for v in ops.values()) // 2
    if convention == "thop":
        per_module = _thop_view(model, per_module)
        return per_module.get("", 0), per_module
    return counter.get_total_flops() // 2, per_module


def module_names(root: nn.Module, modules: Iterable[nn.Module]) -> list[str]:
    """Names of `modules` inside `root` (a module that is not inside raises ConfigError)."""
    index = {id(m): n for n, m in root.named_modules()}
    names = []
    for m in modules:
        if id(m) not in index:
            raise ConfigError(f"{type(m).__name__} is not a submodule of {type(root).__name__}")
        names.append(index[id(m)])
    return names


def macs_of(per_module: dict[str, int], names: Iterable[str]) -> int:
    """Sum of the counted MACs of the named modules (0 for a module that ran no counted op)."""
    return sum(per_module.get(n, 0) for n in names)


@dataclass(frozen=True)
class MacProfile:
    """Counted MACs of a model at batch 1: `total` (M), and per block the attention branch the compressed block
    removes (`attention`, M_a) and its MLP (`mlp`, M_m), with the MLP's `hidden` units and the model width `dim`."""

    convention: str
    total: int
    attention: tuple[int, ...]
    mlp: tuple[int, ...]
    hidden: tuple[int, ...]
    dim: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "convention": self.convention,
            "total": self.total,
            "attention": list(self.attention),
            "mlp": list(self.mlp),
            "hidden": list(self.hidden),
            "dim": self.dim,
        }
