"""Few-shot inputs as one stacked tensor (images) or dict of tensors (text); labels are dropped on entry."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from thrifty.compress.calibration import iter_inputs
from thrifty.errors import ConfigError


Inputs = Any  # torch.Tensor (S, C, H, W) | dict[str, torch.Tensor] of (S, L)


def num_samples(inputs: Inputs) -> int:
    if isinstance(inputs, dict):
        return int(next(iter(inputs.values())).shape[0])
    return int(inputs.shape[0])


def take(inputs: Inputs, index: torch.Tensor | slice) -> Inputs:
    if isinstance(inputs, dict):
        return {k: v[index] for k, v in inputs.items()}
    return inputs[index]


def to_device(inputs: Inputs, device: torch.device) -> Inputs:
    if isinstance(inputs, dict):
        return {k: v.to(device) for k, v in inputs.items()}
    return inputs.to(device)


def _cat(parts: list[Inputs]) -> Inputs:
    if isinstance(parts[0], dict):
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return torch.cat(parts)


def collect(batches: Iterable[Any], first: int, second: int = 0) -> tuple[Inputs, Inputs | None]:
    """The first `first` samples of `batches` and, if `second`, the next `second` ones (None when absent). Each
    batch is inputs or an (inputs, labels) pair: labels are dropped here, before anything reads them."""
    parts = list(iter_inputs(batches, first + second))
    if not parts:
        raise ConfigError("DC-ViT got no few-shot samples; pass a non-empty iterable of batches")
    stacked = _cat([p if isinstance(p, dict) else torch.as_tensor(p) for p in parts])
    n = num_samples(stacked)
    if n < first:
        raise ConfigError(f"DC-ViT asked for samples={first} few-shot samples but the batches hold only {n}")
    rest = take(stacked, slice(first, n)) if second and n > first else None
    return take(stacked, slice(0, first)), rest


def batches_of(inputs: Inputs, batch_size: int, order: torch.Tensor | None = None) -> Iterator[Inputs]:
    """Consecutive batches of `inputs` (in `order`, if given); the last one may be smaller (no drop_last)."""
    n = num_samples(inputs)
    idx = torch.arange(n) if order is None else order
    for start in range(0, n, batch_size):
        yield take(inputs, idx[start : start + batch_size])


def flip(inputs: Inputs, generator: torch.Generator) -> Inputs:
    """Random horizontal flip of half the images (p = 0.5 each); text inputs pass unchanged."""
    if isinstance(inputs, dict) or inputs.ndim != 4:
        return inputs
    mask = torch.rand(inputs.shape[0], generator=generator) < 0.5
    out = inputs.clone()
    out[mask] = inputs[mask].flip(-1)
    return out
