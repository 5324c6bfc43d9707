"""`QLinear`: a bias-free linear layer whose weight is fake-quantized to `bits` with one Gaussian L1-optimal
codebook per matrix (Jie et al., ICCV 2023, `binary_adapter/utils.py`; spec side-tuning.md §5.2).

Per matrix W (out, in), every forward:

    mu = W.mean();  sigma = W.std()                       # unbiased std, one pair per matrix
    Wn = (W - mu) / (sigma + 1e-5)
    Wq = levels[idx(Wn)]                                  # nearest codebook level (ties go up, see below)
    W_eff = STE(Wn -> Wq) * sigma + mu                    # forward value Wq * sigma + mu
    y = x @ W_eff.T

Straight-through estimator as in the reference: dWq/dWn = identity, and gradients also flow into mu and sigma
(both computed from W with grad). The reference writes `Wn + (Wq - Wn).detach()`; we write `Wq + (Wn - Wn.detach())`,
which has the same gradient but whose forward value is *exactly* `Wq` (x - x == 0 in floating point), so the saved
codes (levels[idx] * sigma + mu) reproduce the training-time forward bit for bit.

Codebook: Lloyd iteration for the L1 error of N(0, 1), 500 iterations from all-zero levels (conditional medians);
1 bit gives +-0.67449, 2 bits +-0.37775, +-1.26572. `bits=32` means no quantization (plain linear).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from thrifty.errors import CheckpointError, ConfigError


EPS = 1e-5  # added to sigma in the normalization only (as in the reference)
SUPPORTED_BITS = (1, 2, 4, 8, 32)
LLOYD_ITERATIONS = 500


@functools.cache
def gaussian_l1_levels(bits: int, iterations: int = LLOYD_ITERATIONS) -> tuple[float, ...]:
    """The 2**bits ascending levels minimizing E|z - q(z)| for z ~ N(0, 1) (the reference's Lloyd iteration).

    Each step: thresholds t = midpoints of adjacent levels, p = [0, Phi(t), 1], level_i = Phi^-1((p_i + p_i+1) / 2),
    i.e. the conditional median of each cell. Computed in float64 with scipy (as the reference)."""
    import numpy as np
    from scipy.special import ndtr, ndtri

    if bits not in SUPPORTED_BITS or bits == 32:
        raise ConfigError(f"`bits` must be one of 1, 2, 4, 8 for a codebook, got {bits!r}")
    v = np.zeros(2**bits)
    for _ in range(iterations):
        t = (v[1:] + v[:-1]) / 2
        p = np.concatenate([[0.0], ndtr(t), [1.0]])
        v = ndtri((p[1:] + p[:-1]) / 2)
    return tuple(float(x) for x in v)


def codebook(bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(levels (2**bits,), thresholds (2**bits - 1,)) as float32 tensors; thresholds are level midpoints."""
    v = torch.tensor(gaussian_l1_levels(bits), dtype=torch.float64)
    return v.float(), ((v[1:] + v[:-1]) / 2).float()


def quantize_indices(wn: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Codebook index of each normalized weight: the number of thresholds <= wn (an exact tie goes to the upper
    level; the reference's sign-sum maps a tie to an unstorable midpoint instead, see docs/methods.md)."""
    return torch.bucketize(wn, thresholds, right=True)


def ste_weight(w: torch.Tensor, levels: torch.Tensor, thresholds: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(W_eff, idx, mu, sigma) for a latent weight `w` (any shape); W_eff has the reference's STE gradient."""
    mu, sigma = w.mean(), w.std()
    wn = (w - mu) / (sigma + EPS)
    idx = quantize_indices(wn.detach(), thresholds)
    wq = levels[idx]
    w_eff = (wq + (wn - wn.detach())) * sigma + mu
    return w_eff, idx, mu.detach(), sigma.detach()


def dequantize(idx: torch.Tensor, levels: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """levels[idx] * sigma + mu: the same float32 ops (and values) as the training-time forward."""
    return levels[idx] * sigma + mu


class QLinear(nn.Module):
    """y = x @ W_eff.T, no bias. `weight` (out, in) is the latent full-precision weight while training.

    After `load_codes(...)` the layer is *frozen*: `weight` holds the dequantized matrix and the forward uses it
    directly (exactly the saved model); `unfreeze_()` re-enables fake quantization on it (e.g. to keep training).
    """

    def __init__(self, in_features: int, out_features: int, bits: int, device=None, dtype=None):
        super().__init__()
        if bits not in SUPPORTED_BITS:
            raise ConfigError(f"`bits` must be one of {SUPPORTED_BITS}, got {bits!r}")
        if bits < 32 and in_features * out_features < 2:
            raise ConfigError(f"a quantized matrix needs >= 2 entries (std), got {out_features}x{in_features}")
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # PyTorch's default nn.Linear init
        self.frozen = False
        self._codes: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (idx, mu, sigma) when frozen
        if bits < 32:
            levels, thresholds = codebook(bits)
            self.register_buffer("levels", levels.to(device), persistent=False)
            self.register_buffer("thresholds", thresholds.to(device), persistent=False)

    @property
    def quantized(self) -> bool:
        return self.bits < 32

    def effective_weight(self) -> torch.Tensor:
        """(out, in) weight the forward uses."""
        if not self.quantized or self.frozen:
            return self.weight
        return ste_weight(self.weight, self.levels, self.thresholds)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight())

    @torch.no_grad()
    def export_codes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(idx (out*in,) int64 row-major, mu () float32, sigma () float32) of the current forward."""
        if not self.quantized:
            raise TypeError("a 32-bit QLinear has no codes; store its weight")
        if self.frozen and self._codes is not None:
            return self._codes
        _, idx, mu, sigma = ste_weight(self.weight, self.levels, self.thresholds)
        return idx.reshape(-1).cpu(), mu.float().cpu(), sigma.float().cpu()

    @torch.no_grad()
    def load_codes(self, idx: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, source: str = "file") -> None:
        """Set W = levels[idx] * sigma + mu and freeze (the reference's `byte2adapter` + quant off)."""
        n = self.weight.numel()
        if idx.numel() != n or int(idx.max()) >= 2**self.bits or int(idx.min()) < 0:
            raise CheckpointError(f"{source}: codes do not fit a {self.out_features}x{self.in_features} matrix")
        mu, sigma = mu.reshape(()).float(), sigma.reshape(()).float()
        if not (torch.isfinite(mu) and torch.isfinite(sigma)):
            raise CheckpointError(f"{source}: mean/std are not finite; the file is corrupt")
        w = dequantize(idx.reshape(self.weight.shape).to(self.levels.device), self.levels, mu, sigma)
        self.weight.copy_(w)
        self._codes = (idx.reshape(-1).cpu().long(), mu.cpu(), sigma.cpu())
        self.frozen = True

    def unfreeze_(self) -> QLinear:
        """Back to fake quantization of `weight` (a loaded layer re-quantizes its dequantized weight)."""
        self.frozen, self._codes = False, None
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, bias=False"
