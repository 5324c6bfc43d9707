"""The model seen as the sequence the compensation methods walk: embed -> block 0 .. block L-1 -> tail.

Works for a thrifty `Backbone` (tail = pool(norm(h))) or a `TunedModel` whose features are the backbone's
(tail = head(pool(norm(h)))). Also records the raw calibration inputs between prepare and convert.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from thrifty.backbones import Backbone
from thrifty.compress.calibration import batch_size, slice_inputs
from thrifty.errors import ConfigError


INPUTS_ATTR = "_thrifty_calib_inputs"


class Pipeline:
    """embed / block / tail of a backbone-protocol model; `rows` picks the real tokens of a (B, N, D) tensor."""

    def __init__(self, model: nn.Module):
        from thrifty.tuners.base import TunedModel

        if isinstance(model, Backbone):
            self.backbone, self.head = model, None
        elif isinstance(model, TunedModel):
            if type(model).features is not TunedModel.features:
                raise ConfigError(
                    f"{type(model).__name__} computes its own features; compensation needs the plain "
                    "embed -> blocks -> pool -> head path (quantize a full / merged-LoRA / linear model)"
                )
            self.backbone, self.head = model.backbone, model.head
        else:
            raise ConfigError(
                "QwT / QwT-v2 need a thrifty Backbone or TunedModel (load_backbone / load_tuned_model); "
                f"got {type(model).__name__}"
            )

    @property
    def num_blocks(self) -> int:
        return len(self.backbone.blocks)

    def embed(self, x: Any) -> tuple[torch.Tensor, Any]:
        return self.backbone.embed(x)

    def block(self, i: int, h: torch.Tensor, ctx: Any) -> torch.Tensor:
        return self.backbone.run_block(i, h, ctx)

    def tail(self, h: torch.Tensor, ctx: Any) -> torch.Tensor:
        bb = self.backbone
        f = bb.pool(bb.norm(h), ctx)
        return f if self.head is None else self.head(f)

    def token_mask(self, h: torch.Tensor, ctx: Any) -> torch.Tensor | None:
        return self.backbone.token_mask(ctx, h) if h.dim() == 3 else None

    def block_inputs(self, batches: list[Any], upto: int, cache: list | None) -> Iterator[tuple[torch.Tensor, Any]]:
        """Inputs (h, ctx) of block `upto` for every batch: from `cache` (list of block inputs, when kept) or by
        re-running embed and the (already compensated, quantized) blocks before it."""
        if cache is not None:
            yield from cache
            return
        for x in batches:
            h, ctx = self.embed(x)
            for j in range(upto):
                h = self.block(j, h, ctx)
            yield h, ctx


def rows(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, N, D) -> (n, D) real-token rows; (B, D) stays; (B, C, H, W) -> (B*H*W, C)."""
    if t.dim() == 4:
        return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])
    if t.dim() == 3 and mask is not None and tuple(mask.shape) == tuple(t.shape[:2]):
        return t[mask]
    return t.reshape(-1, t.shape[-1])


def _record_inputs_hook(module: nn.Module, args: tuple) -> None:
    store = getattr(module, INPUTS_ATTR, None)
    if store is None or not args:
        return
    x = args[0]
    left = store["max"] - store["seen"]
    if left <= 0:
        return
    n = batch_size(x)
    x = slice_inputs(x, min(n, left))
    x = {k: v.detach().cpu().clone() for k, v in x.items()} if isinstance(x, dict) else x.detach().cpu().clone()
    store["batches"].append(x)
    store["seen"] += min(n, left)


def start_recording(model: nn.Module, max_samples: int) -> None:
    """Keep the first `max_samples` calibration inputs the model is called with (on CPU)."""
    object.__setattr__(model, INPUTS_ATTR, {"max": int(max_samples), "seen": 0, "batches": []})
    model.register_forward_pre_hook(_record_inputs_hook)


def stop_recording(model: nn.Module) -> list[Any]:
    """Remove the recorder; returns the recorded batches (raises if none)."""
    store = getattr(model, INPUTS_ATTR, None)
    for key in [k for k, fn in model._forward_pre_hooks.items() if fn is _record_inputs_hook]:
        del model._forward_pre_hooks[key]
    if store is None or not store["batches"]:
        raise ConfigError("no calibration inputs were recorded; run batches between prepare and convert")
    object.__delattr__(model, INPUTS_ATTR)
    return store["batches"]


def to_device(x: Any, device: torch.device) -> Any:
    return {k: v.to(device) for k, v in x.items()} if isinstance(x, dict) else x.to(device)
