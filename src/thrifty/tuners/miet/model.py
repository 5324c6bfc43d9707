"""MIET edge network: low-rank self-attention (LAST's LSA blocks) over the one gathered map the server sends.

The gather Gather*(B, x, k) = z_first + ... + z_k (thrifty.features.taps, tap `gather.<k>`) is computed by the
frozen backbone under `torch.no_grad()`: locally (`forward(x)`), from a feature cache, or by a feature server
(`thrifty serve`, thrifty.serve); the edge network only ever reads that one (B, N, D) map (+ the text mask).
"""

from __future__ import annotations

import torch
from torch import nn

from thrifty.errors import ConfigError
from thrifty.features.taps import MASK, gather_tap
from thrifty.tuners.last.lsa import LowRankSelfAttention
from thrifty.tuners.side import SideTuner, pool_tokens


def resolve_k(k: int | None, first: int, num_blocks: int) -> int:
    """k in [first, L] for a backbone with L = `num_blocks` blocks (maps z_0..z_L); None = L, negative from L."""
    n = num_blocks + 1
    if k is None:
        k = num_blocks
    if not -n <= k < n:
        raise ConfigError(
            f"`k` = {k} is out of range: the backbone has maps z_0..z_{num_blocks} (k in 0..{num_blocks})"
        )
    k %= n
    if first > k:
        raise ConfigError(f"`first` = {first} must not exceed k = {k}")
    return k


class EdgeNetwork(nn.Module):
    """`depth` LSA blocks on the gathered map, then (after pooling) the edge's own LayerNorm.

    forward: g (B, N, D), mask (B, N) bool or None -> y (B, N, D) = LSA_depth(... LSA_1(g)).
    Parameters: depth * (2D + 3rD + 3r + rD + D) + 2D (with biases)."""

    def __init__(self, dim: int, depth: int, rank: int, heads: int, bias: bool = True, eps: float = 1e-6):
        super().__init__()
        self.blocks = nn.ModuleList(LowRankSelfAttention(dim, rank, heads, bias=bias, eps=eps) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, g: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        y = g
        for lsa in self.blocks:
            y = lsa(y, mask)
        return y


class MietModel(SideTuner):
    def _setup(self) -> None:
        cfg, bb = self.config, self.backbone
        if bb.kind not in ("vit", "text"):
            raise ConfigError(f"miet needs a token backbone (timm ViT or a text encoder), not {bb.kind!r}")
        self.k = resolve_k(cfg.k, cfg.first, len(bb.blocks))
        self.gather_name = gather_tap(self.k, cfg.first)
        self.num_prefix = int(getattr(bb, "num_prefix_tokens", 0)) if bb.kind == "vit" else 0
        self.edge = EdgeNetwork(bb.tap_dim, cfg.depth, cfg.r, cfg.heads, cfg.bias)

    def tap_names(self) -> list[str]:
        return [self.gather_name, MASK] if self.backbone.kind == "text" else [self.gather_name]

    def features_from_taps(self, taps: dict[str, torch.Tensor]) -> torch.Tensor:
        """taps: {gather.<k>: (B, N, D), mask: (B, N) bool for text} -> (B, D) head input LN(pool(y))."""
        mask = taps.get(MASK)
        y = self.edge(taps[self.gather_name], mask)
        return self.edge.norm(pool_tokens(y, mask, self.num_prefix, self.config.pool))
