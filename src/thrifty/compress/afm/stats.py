"""Streamed float64 feature statistics: sums, so batches (and torchrun ranks) add up exactly.

    n = Σ 1,  s = Σ y (D,),  S = Σ y yᵀ (D, D)          over every proxy sample (token) y
    E[y] = s / n,   Cov(y) = S / n − E[y] E[y]ᵀ = U Σ Uᵀ  (eigh, float64)

Under torchrun (`torch.distributed` initialised, world size > 1) `all_reduce_` sums (n, s, S) over the ranks
before any eigen-decomposition, so N processes that each see a shard give the factors of one process that sees
all of it (up to float64 summation order). Eigenvectors get a canonical sign (largest-magnitude entry positive).
"""

from __future__ import annotations

import torch

from thrifty.errors import ConfigError


class FeatureStats:
    """(n, Σy, Σyyᵀ) of D-dim features in float64; `update` takes (..., D)."""

    def __init__(self, dim: int, device: torch.device | str = "cpu"):
        self.dim = int(dim)
        self.n = 0
        self.sum = torch.zeros(self.dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, y: torch.Tensor) -> None:
        y = y.detach().reshape(-1, self.dim).to(self.sum.device, torch.float64)
        self.n += y.shape[0]
        self.sum += y.sum(0)
        self.outer.addmm_(y.T, y)

    def merge_(self, other: FeatureStats) -> FeatureStats:
        self.n += other.n
        self.sum += other.sum
        self.outer += other.outer
        return self

    def all_reduce_(self) -> FeatureStats:
        """Sum over torchrun ranks (no-op in one process)."""
        if distributed():
            import torch.distributed as dist

            n = torch.tensor([float(self.n)], dtype=torch.float64, device=self.sum.device)
            for t in (n, self.sum, self.outer):
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
            self.n = round(float(n.item()))
        return self

    def mean(self) -> torch.Tensor:
        self._check()
        return self.sum / self.n

    def cov(self) -> torch.Tensor:
        """Cov(y) = E[yyᵀ] − E[y]E[y]ᵀ (float64, symmetrised)."""
        self._check()
        mu = self.sum / self.n
        c = self.outer / self.n - torch.outer(mu, mu)
        return 0.5 * (c + c.T)

    def _check(self) -> None:
        if self.n == 0:
            raise ConfigError("the proxy set gave no samples for a targeted layer; pass non-empty calibration batches")


def distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def canonical_signs(vectors: torch.Tensor) -> torch.Tensor:
    """Columns flipped so that each one's largest-magnitude entry is positive (eigenvectors are sign-free)."""
    idx = vectors.abs().argmax(0)
    signs = torch.sign(vectors[idx, torch.arange(vectors.shape[1])])
    signs[signs == 0] = 1
    return vectors * signs


def eig_desc(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending, clamped at 0) and their eigenvectors (columns, canonical signs), float64."""
    values, vectors = torch.linalg.eigh(cov.to(torch.float64))
    values, vectors = values.flip(0).clamp_min(0.0), vectors.flip(1)
    return values, canonical_signs(vectors)


def energy_rank(spectrum: torch.Tensor, energy: float) -> int:
    """The smallest k whose top-k eigenvalues hold `energy` of the total (spectrum descending)."""
    total = float(spectrum.sum())
    if total <= 0.0:
        return 1
    kept = torch.cumsum(spectrum, 0) / total
    return int(min(len(spectrum), int((kept < energy - 1e-12).sum()) + 1))
