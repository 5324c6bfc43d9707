"""LAST-like side-tuning: a side network of LSA blocks fed with the frozen backbone's block outputs.

The backbone runs once under `torch.no_grad()` (thrifty.features.taps); the side network only reads its outputs,
so zero bytes are saved for backward inside the backbone, the taps can come from a feature cache
(`forward_from_taps`), and many side networks can share one backbone pass (`thrifty train --sweep`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from thrifty.errors import ConfigError
from thrifty.features.taps import MASK, block_tap, resolve_blocks
from thrifty.tuners.last.lsa import LowRankSelfAttention
from thrifty.tuners.side import SideTuner, pool_tokens


class LastSideNetwork(nn.Module):
    """One LSA block per tap; `forward(taps, mask)` -> the bias-corrected side representation y, (B, N, D)."""

    def __init__(
        self, dim: int, num_taps: int, rank: int, heads: int, lsa_input: str, bias_correction: bool, bias: bool
    ):
        super().__init__()
        self.blocks = nn.ModuleList(LowRankSelfAttention(dim, rank, heads, bias=bias) for _ in range(num_taps))
        self.lsa_input, self.bias_correction = lsa_input, bias_correction

    def forward(self, taps: Sequence[torch.Tensor], mask: torch.Tensor | None = None) -> torch.Tensor:
        """taps: z_m for the tapped blocks in depth order, each (B, N, D) (frozen, no grad)."""
        if len(taps) != len(self.blocks):
            raise ConfigError(f"LAST side network has {len(self.blocks)} LSA blocks but got {len(taps)} taps")
        total = None  # sum_{i<=m} z_i (no grad: data)
        d = None  # task-specific part: the sum of the LSA branch outputs so far
        for z, lsa in zip(taps, self.blocks):
            total = z if total is None else total + z
            base = total if self.lsa_input == "sum" else z  # u_m - sum_{i<m} z_i = z_m + d
            delta = lsa.branch(base if d is None else base + d, mask)
            d = delta if d is None else d + delta
        base = taps[-1] if self.bias_correction else total  # u_M - sum_{i<M} z_i = z_M + d  (or u_M)
        return base + d


class LastModel(SideTuner):
    def _setup(self) -> None:
        cfg, bb = self.config, self.backbone
        if bb.kind not in ("vit", "text"):
            raise ConfigError(f"last needs a token backbone (timm ViT or a text encoder), not {bb.kind!r}")
        self.tap_blocks = resolve_blocks(cfg.taps, len(bb.blocks), "taps")
        self.num_prefix = int(getattr(bb, "num_prefix_tokens", 0)) if bb.kind == "vit" else 0
        self.last = LastSideNetwork(
            bb.tap_dim, len(self.tap_blocks), cfg.r, cfg.heads, cfg.lsa_input, cfg.bias_correction, cfg.bias
        )

    def tap_names(self) -> list[str]:
        names = [block_tap(i) for i in self.tap_blocks]
        return [*names, MASK] if self.backbone.kind == "text" else names

    def features_from_taps(self, taps: dict[str, torch.Tensor]) -> torch.Tensor:
        """taps: {block.<i>: (B, N, D) for the tapped blocks, mask: (B, N) bool for text} -> (B, D) head input."""
        mask = taps.get(MASK)
        y = self.last([taps[block_tap(i)] for i in self.tap_blocks], mask)
        return self.backbone.norm(pool_tokens(y, mask, self.num_prefix, self.config.pool))
