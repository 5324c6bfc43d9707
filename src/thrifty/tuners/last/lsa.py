"""Low-rank self-attention (LSA), the building block of LAST's side network (reused by edge tuning, MIET).

    LSA(x) = x + up(Attn(q, k, v)),   [q | k | v] = W_qkv LN(x) in R^{N x 3r},   r << D
    Attn = softmax(q k^T / sqrt(r / heads)) v per head, in the r-dimensional space; up: r -> D, zero at init.

Shapes: x (B, N, D) -> (B, N, D); mask (B, N) bool, True = real token (padding keys get no attention).
Parameters: LN 2D + D*3r (+3r) + r*D (+D). No MLP: the only D-wide operations are LN and the two projections.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from thrifty.errors import ConfigError


class LowRankSelfAttention(nn.Module):
    def __init__(
        self,
        dim: int,
        rank: int,
        heads: int = 1,
        *,
        bias: bool = True,
        eps: float = 1e-6,
        zero_init: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if rank <= 0 or heads <= 0 or rank % heads:
            raise ConfigError(f"LSA needs rank > 0 divisible by heads > 0, got rank={rank}, heads={heads}")
        dd = {"device": device, "dtype": dtype}
        self.rank, self.heads = rank, heads
        self.norm = nn.LayerNorm(dim, eps=eps, **dd)
        self.qkv = nn.Linear(dim, 3 * rank, bias=bias, **dd)
        self.up = nn.Linear(rank, dim, bias=bias, **dd)
        if zero_init:  # the block starts as the identity
            nn.init.zeros_(self.up.weight)
            if bias:
                nn.init.zeros_(self.up.bias)

    def attend(self, qkv: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention in the r-dimensional space: (B, N, 3r) projections -> (B, N, r) attention output o."""
        b, n, _ = qkv.shape
        q, k, v = qkv.reshape(b, n, 3, self.heads, self.rank // self.heads).permute(2, 0, 3, 1, 4)  # (B, h, N, r/h)
        attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, N): keys that may be attended
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, h, N, r / h)
        return o.transpose(1, 2).reshape(b, n, self.rank)

    def project_up(self, o: torch.Tensor) -> torch.Tensor:
        """up(o): (B, N, r) -> (B, N, D), as [o | 1] @ [W_up^T ; b_up], one (BN, r + 1) x (r + 1, D) product.

        Same function as `self.up(o)` (up to float rounding; exactly 0 while up is zero). Why: `addmm` on CPU first
        copies the broadcast bias into its (BN, D) output and autograd reduces a (BN, D) gradient for the bias, two
        passes over a D-wide tensor that the ones column folds into the matmul (LAST step about 8 % faster on the
        2-core CPU, docs/methods.md)."""
        if self.up.bias is None:
            return self.up(o)
        b, n, r = o.shape
        o1 = torch.cat([o.reshape(b * n, r), o.new_ones(b * n, 1)], 1)  # (BN, r + 1)
        w1 = torch.cat([self.up.weight.t(), self.up.bias[None]], 0)  # (r + 1, D)
        return torch.mm(o1, w1).view(b, n, -1)

    def branch(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The residual branch up(Attn(...)) alone, (B, N, D)."""
        return self.project_up(self.attend(self.qkv(self.norm(x)), mask))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return x + self.branch(x, mask)
