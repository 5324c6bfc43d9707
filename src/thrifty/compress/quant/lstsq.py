"""Closed forms streamed over calibration batches in float64: QwT's least squares and QwT-v2's channel affine.

QwT (compression.md §1.3), for G independent groups (G = 1 for a transformer block):

    X~ = [X, 1]  (n, f + 1),   [W; b] = (X~' X~ + lambda I)^-1 X~' R,
    R^2 = 1 - ||R - X~ [W; b]||^2 / ||R - mean(R)||^2

Only A = X~' X~ (G, f+1, f+1), B = X~' R (G, f+1, m), sum ||R||^2 and n are kept, so no design matrix of all
tokens is ever built. R^2 comes from the same statistics:
||R - X~T||^2 = sum R^2 - 2 tr(T' B) + tr(T' A T) and column sums of R = the last row of B.

CWAC (compression.md §2.2), per output channel c: a_c = Cov(y_q, y_fp) / (Var(y_q) + eps),
beta_c = E[y_fp] - a_c E[y_q], from running sums.
"""

from __future__ import annotations

import torch


class NormalEquations:
    """Streaming least squares of R (n, m) on [X, 1] (n, f + 1), batched over G groups, float64."""

    def __init__(self, features: int, outputs: int, groups: int = 1, device: torch.device | str = "cpu"):
        k = features + 1
        self.A = torch.zeros(groups, k, k, dtype=torch.float64, device=device)
        self.B = torch.zeros(groups, k, outputs, dtype=torch.float64, device=device)
        self.r_sq = torch.zeros((), dtype=torch.float64, device=device)
        self.n = 0

    def update(self, X: torch.Tensor, R: torch.Tensor) -> None:
        """X (n, f) or (G, n, f); R (n, m) or (G, n, m)."""
        if X.dim() == 2:
            X, R = X.unsqueeze(0), R.unsqueeze(0)
        X, R = X.double(), R.double()
        Xa = torch.cat([X, X.new_ones(*X.shape[:2], 1)], -1)
        self.A += Xa.transpose(1, 2) @ Xa
        self.B += Xa.transpose(1, 2) @ R
        self.r_sq += (R * R).sum()
        self.n += X.shape[1]

    def solve(self, ridge: float = 0.0, rtol: float = 1e-10) -> torch.Tensor:
        """Theta (G, f + 1, m): rows [:-1] are W, row [-1] is b.

        Solved with the symmetric pseudo-inverse of (A + ridge I), eigenvalues below `rtol` * max cut: equal to the
        OLS solution when A is well conditioned, and the minimum-norm one when it is (near) singular, as for the
        post-LayerNorm inputs of a BERT block, whose centred channels are collinear with the ones column."""
        if self.n == 0:
            raise RuntimeError("no samples were accumulated")
        A = self.A + ridge * torch.eye(self.A.shape[-1], dtype=self.A.dtype, device=self.A.device)
        return torch.linalg.pinv(A, rtol=rtol, hermitian=True) @ self.B

    def sse(self, theta: torch.Tensor) -> float:
        """||R - X~ Theta||^2 summed over groups and outputs."""
        t_b = (theta * self.B).sum()
        t_a_t = (theta * (self.A @ theta)).sum()
        return float(self.r_sq - 2 * t_b + t_a_t)

    def sst(self) -> float:
        """||R - mean(R)||^2 with column means over all rows (every group sees the same rows)."""
        col_sums = self.B[:, -1, :]  # (G, m): sums of R's columns
        return float(self.r_sq - (col_sums * col_sums).sum() / self.n)

    def r2(self, theta: torch.Tensor) -> float:
        sst = self.sst()
        if sst <= 0:
            return 0.0
        return 1.0 - self.sse(theta) / sst


class ChannelAffine:
    """Streaming per-channel 1-D least squares y_fp ~ a * y_q + beta over rows (n, C), float64."""

    def __init__(self, channels: int, device: torch.device | str = "cpu"):
        z = lambda: torch.zeros(channels, dtype=torch.float64, device=device)  # noqa: E731
        self.sq, self.sf, self.sqq, self.sqf, self.sff = z(), z(), z(), z(), z()
        self.n = 0

    def update(self, y_q: torch.Tensor, y_fp: torch.Tensor) -> None:
        """y_q, y_fp (n, C)."""
        q, f = y_q.double(), y_fp.double()
        self.sq += q.sum(0)
        self.sf += f.sum(0)
        self.sqq += (q * q).sum(0)
        self.sqf += (q * f).sum(0)
        self.sff += (f * f).sum(0)
        self.n += q.shape[0]

    def solve(self, eps: float = 1e-8, fit: str = "ls") -> tuple[torch.Tensor, torch.Tensor]:
        """(a, beta), each (C,) float64. `fit="ls"`: least squares, a = Cov / Var(y_q) (shrinks towards 0 when y_q
        is y_fp plus noise); `"moments"`: a = Std(y_fp) / Std(y_q) (matches mean and variance, no shrinkage);
        `"bias"`: a = 1 (mean shift only). Channels whose fit is degenerate (Var(y_q) ~ 0) or has a <= 0 keep
        a = 1 and get the mean shift only (bias correction), so a folded weight scale stays positive."""
        if self.n == 0:
            raise RuntimeError("no samples were accumulated")
        n = self.n
        mq, mf = self.sq / n, self.sf / n
        var = self.sqq / n - mq * mq
        cov = self.sqf / n - mq * mf
        if fit == "moments":
            a = ((self.sff / n - mf * mf).clamp_min(0) / (var + eps)).sqrt()
        elif fit == "bias":
            a = torch.ones_like(var)
        else:
            a = cov / (var + eps)
        ok = torch.isfinite(a) & (a > 0) & (var > 1e-12 * (self.sqq / n).clamp_min(1e-30))
        a = torch.where(ok, a, torch.ones_like(a))
        return a, mf - a * mq

    def sse(self, a: torch.Tensor, beta: torch.Tensor) -> float:
        """sum_c ||y_fp - a y_q - beta||^2 (a = 1, beta = 0 gives the error before compensation)."""
        n = self.n
        e = (
            self.sff
            - 2 * a * self.sqf
            - 2 * beta * self.sf
            + a * a * self.sqq
            + 2 * a * beta * self.sq
            + n * beta * beta
        )
        return float(e.sum())
