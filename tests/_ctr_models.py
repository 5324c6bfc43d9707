"""Tiny CTR models and batches for the afm tests and the compressor contract (no data package needed)."""

from __future__ import annotations

import torch

from thrifty.backbones import load_backbone


SCHEMA = {"fields": [["a", 11], ["b", 7], ["c", 5]]}


def tiny_ctr(kind: str = "deepfm", seed: int = 0, mlp: str = "32-24-16", embed: int = 8):
    """A seeded, perturbed (weights not at their tiny init) CTR TunedModel with the binary head, frozen, eval."""
    from thrifty.tuners import get_tuned_model, make_config

    bb = load_backbone(f"ctr:{kind},embed={embed},mlp={mlp}")
    bb.build_from_schema_(SCHEMA, seed=seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = get_tuned_model(bb, make_config("full"), 2, objective="binary").eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def tiny_batches(n: int = 4, size: int = 64, seed: int = 0, labels: bool = True) -> list:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = {f: torch.randint(0, v, (size,), generator=g) for f, v in SCHEMA["fields"]}
        out.append((x, torch.randint(0, 2, (size,), generator=g)) if labels else x)
    return out
