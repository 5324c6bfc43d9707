"""Healing: a short LoRA fine-tune of the compressed model, merged back into its weights (the paper heals with LoRA;
its data, steps, rank and learning rate are NOT FOUND, compression.md §4.2).

    heal_(model, train)     # train(model) runs the caller's loop, e.g. the causal_lm objective on calibration text

thrifty's `LoraLinear` (PEFT's initialisation: B = 0, so healing starts from the compressed model) wraps the
attention projections; everything else is frozen while `train` runs; afterwards each update is merged
(W <- W + scaling * B A) and the plain Linear is put back, so the result is again a stock transformers model.
On BERT only the query and output projections are healed: its key/value rows hold one shared head repeated per
slot (fold.py), and per-slot updates would undo the head sharing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from thrifty.compress.kv_heads.sites import find_attention_sites
from thrifty.tuners.lora.layer import LoraLinear
from thrifty.tuners.targeting import find_targets, set_submodule


def default_heal_targets(model: nn.Module) -> list[str]:
    """Full names of the attention projections healing adapts (all of q/k/v/o; BERT: query and output)."""
    names = {id(m): n for n, m in model.named_modules()}
    out = []
    for site in find_attention_sites(model):
        which = "qkvo" if site.family == "llama" else "qo"
        out.extend(names[id(site.linear(w))] for w in which)
    return out


def heal_(
    model: nn.Module,
    train: Callable[[nn.Module], Any],
    *,
    r: int = 8,
    lora_alpha: float = 16.0,
    target_modules: str | Sequence[str] | None = None,
) -> Any:
    """LoRA-heal `model` in place with the caller's training loop `train(model)`; returns what `train` returns.
    `target_modules` follows PEFT's rules (default: `default_heal_targets`)."""
    targets = find_targets(model, target_modules or default_heal_targets(model))
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped: dict[str, LoraLinear] = {}
    for name in targets:
        layer = LoraLinear(model.get_submodule(name), r=r, lora_alpha=lora_alpha)
        set_submodule(model, name, layer)
        wrapped[name] = layer
    try:
        result = train(model)
    finally:
        for name, layer in wrapped.items():
            set_submodule(model, name, layer.merged())
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, False))
    return result
