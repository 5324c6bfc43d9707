"""DTL / DTL+ forward: an explicit loop over the backbone's blocks (embed / run_block / norm), never a fork.

    h = 0
    for b in 0..L-1:
        if b in map_blocks: h = h + B_b A_b x_b          # x_b: input of block b, un-normalized, all tokens
        x_{b+1} = block_b(x_b)                            # frozen; under no_grad until the first addition
        if b >= M: x_{b+1} = x_{b+1} + fuse(swish_beta(h))  # fuse = identity (DTL) or shared DWConv (DTL+)
    logits = head(norm(mean of patch tokens of x_L))     # CLS excluded; norm AFTER pooling

Blocks 0..M see no tensor that requires grad (the side signal first enters after block M), so they run under
`torch.no_grad()` and store nothing for backward; backward runs through blocks M+1..L-1 and the tiny CSN.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from thrifty.backbones import Inputs
from thrifty.errors import ConfigError
from thrifty.features.taps import resolve_blocks
from thrifty.tuners.base import TunedModel
from thrifty.tuners.side import pool_tokens


class DTLModel(TunedModel):
    """Backbone + CSN (`dtl_down[j]`: D -> r, `dtl_up[j]`: r -> D, zero init) + optional `dtl_fusion` + head."""

    def _setup(self) -> None:
        cfg, bb = self.config, self.backbone
        if bb.kind not in ("vit", "text"):
            raise ConfigError(f"{cfg.method} needs a token backbone (timm ViT or a text encoder), not {bb.kind!r}")
        n, d = len(bb.blocks), bb.num_features
        self.map_blocks = resolve_blocks(cfg.map_blocks, n, "map_blocks")
        self.add_from = n // 2 if cfg.add_from is None else cfg.add_from
        if not 0 <= self.add_from < n:
            raise ConfigError(f"`add_from` must be in [0, {n}) for a backbone with {n} blocks, got {self.add_from}")
        self.num_prefix = int(getattr(bb, "num_prefix_tokens", 0)) if bb.kind == "vit" else 0
        self.dtl_down = nn.ModuleList(nn.Linear(d, cfg.r, bias=False) for _ in self.map_blocks)  # A_b: (r, D)
        self.dtl_up = nn.ModuleList(nn.Linear(cfg.r, d, bias=False) for _ in self.map_blocks)  # B_b: (D, r)
        for down, up in zip(self.dtl_down, self.dtl_up):
            nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
            nn.init.zeros_(up.weight)  # side signal is exactly 0 at init: the model starts as the frozen backbone
        self.dtl_fusion: nn.Module | None = None
        if cfg.kernel > 0:  # DTL+: PyTorch default init, as the official code
            conv = nn.Conv2d if bb.kind == "vit" else nn.Conv1d  # text: 1-D conv over the token sequence
            self.dtl_fusion = conv(d, d, cfg.kernel, groups=d, bias=False, padding="same")
        self._drop_paths = self._install_drop_path(cfg.drop_path)

    def _install_drop_path(self, rate: float) -> list[nn.Module]:
        """Stochastic depth in the frozen timm blocks (the official recipe's per-task drop_path), timm's linear
        0..rate schedule over depth, by swapping the blocks' `drop_path1/2` Identity modules (no fork)."""
        if rate <= 0:
            return []
        from timm.layers import DropPath

        blocks = self.backbone.blocks
        if not all(hasattr(b, "drop_path1") and hasattr(b, "drop_path2") for b in blocks):
            raise ConfigError("`drop_path` needs timm ViT blocks (drop_path1/drop_path2); set drop_path=0")
        added = []
        for i, b in enumerate(blocks):
            p = rate * i / max(1, len(blocks) - 1)
            if p > 0:
                b.drop_path1, b.drop_path2 = DropPath(p), DropPath(p)
                added += [b.drop_path1, b.drop_path2]
        return added

    def adapter_modules(self) -> list[nn.Module]:
        return self._drop_paths

    # --- forward -------------------------------------------------------------------------------------------
    def _grid(self, n: int) -> tuple[int, int]:
        grid = getattr(self.backbone, "grid_size", None)
        if grid is not None and grid[0] * grid[1] == n:
            return int(grid[0]), int(grid[1])
        s = math.isqrt(n)
        if s * s == n:
            return s, s
        raise ConfigError(f"dtl_plus cannot lay {n} patch tokens on a grid; use the backbone's image size")

    def _fuse(self, s: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """DTL+: the shared depthwise conv over the patch grid (prefix tokens pass unconvolved); for text, a 1-D
        conv over the sequence with padding positions zeroed first. (B, N, D) -> (B, N, D)."""
        b, n, d = s.shape
        if self.backbone.kind == "vit":
            p = self.num_prefix
            gh, gw = self._grid(n - p)
            grid = s[:, p:].transpose(1, 2).reshape(b, d, gh, gw)  # (B, D, H', W')
            out = self.dtl_fusion(grid).flatten(2).transpose(1, 2)  # (B, H'W', D)
            return torch.cat([s[:, :p], out], 1)
        if mask is not None:
            s = s * mask.unsqueeze(-1).to(s.dtype)
        return self.dtl_fusion(s.transpose(1, 2)).transpose(1, 2)

    def features(self, x: Inputs) -> torch.Tensor:
        bb, beta = self.backbone, self.config.beta
        maps = dict(zip(self.map_blocks, range(len(self.map_blocks))))
        with torch.no_grad():
            h, ctx = bb.embed(x)  # (B, N, D)
        mask = bb.token_mask(ctx, h)
        side = None  # running sum of the low-rank maps, (B, N, D)
        for i in range(len(bb.blocks)):
            if i in maps:
                j = maps[i]
                m = self.dtl_up[j](self.dtl_down[j](h))
                side = m if side is None else side + m
            if h.requires_grad:
                h = bb.run_block(i, h, ctx)
            else:  # before the first addition: nothing in the block needs a gradient
                with torch.no_grad():
                    h = bb.run_block(i, h, ctx)
            if i >= self.add_from and side is not None:
                s = side * torch.sigmoid(beta * side)  # swish_beta
                h = h + (s if self.dtl_fusion is None else self._fuse(s, mask))
        return bb.norm(pool_tokens(h, mask, self.num_prefix, "mean"))  # (B, D)
