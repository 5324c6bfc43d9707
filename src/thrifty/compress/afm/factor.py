"""Closed forms of the `afm` compressor (compression.md §5.1-5.3), computed in float64, stored in the layer's dtype.

Linear layer y = W x + b (W: out × in), output statistics E[y], Cov(y) = U Σ Uᵀ, U_k = top-k eigenvectors:

    y ≈ U_k U_kᵀ (y − E[y]) + E[y]
    first:  W1 = U_kᵀ W,  b1 = U_kᵀ b                 (in → k)
    second: W2 = U_k,     b2 = E[y] − U_k U_kᵀ E[y]    (k → out)

`svd_w` (baseline): W = P S Qᵀ, first = √S_k Q_kᵀ (b1 = 0), second = P_k √S_k (b2 = b).

Field table E_f (n × d), statistics of the looked-up rows e (frequency-weighted by the data):
    thin E'_f = (E_f − 1 μ_fᵀ) U_k (n × k),  e ≈ U_k e' + μ_f   (svd_w: E_f = P S Qᵀ, E' = P_k S_k, e ≈ Q_k e')
Merged into the Linear that reads the flattened embeddings [e_1 … e_F] (W = [W_1 … W_F], H × F·d):
    W'_f = W_f U_f (H × k_f),  b' = b + Σ_f W_f μ_f          (an untouched table keeps W'_f = W_f)
"""

from __future__ import annotations

import torch
from torch import nn

from thrifty.backbones.ctr import FactorizedEmbedding


class LowRankLinear(nn.Module):
    """y = second(act(first(x))): Linear(in, k) -> Identity (exact form) or ReLU (`_act`) -> Linear(k, out)."""

    def __init__(self, in_features: int, rank: int, out_features: int, act: bool = False):
        super().__init__()
        self.first = nn.Linear(in_features, rank)
        self.act = nn.ReLU() if act else nn.Identity()
        self.second = nn.Linear(rank, out_features)
        self.in_features, self.rank, self.out_features = in_features, rank, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.act(self.first(x)))


def linear_params(in_features: int, out_features: int, rank: int | None, bias: bool = True) -> int:
    """Parameters of the dense layer (rank None) or of its LowRankLinear (both factors with biases)."""
    if rank is None:
        return in_features * out_features + (out_features if bias else 0)
    return rank * (in_features + 1) + out_features * (rank + 1)


def table_params(num_embeddings: int, dim: int, rank: int | None, projection: bool = True) -> int:
    if rank is None:
        return num_embeddings * dim
    return num_embeddings * rank + ((dim * rank + dim) if projection else 0)


def _bias(lin: nn.Linear) -> torch.Tensor:
    if lin.bias is None:
        return torch.zeros(lin.out_features, dtype=torch.float64, device=lin.weight.device)
    return lin.bias.detach().double()


def _fill(layer: LowRankLinear, w1, b1, w2, b2, like: torch.Tensor) -> LowRankLinear:
    with torch.no_grad():
        pairs = ((layer.first.weight, w1), (layer.first.bias, b1), (layer.second.weight, w2), (layer.second.bias, b2))
        for p, v in pairs:
            p.copy_(v.to(like.dtype))
    return layer.to(like.device)


@torch.no_grad()
def afm_linear(
    lin: nn.Linear, mean: torch.Tensor, vectors: torch.Tensor, rank: int, act: bool = False
) -> LowRankLinear:
    """The AFM pair of `lin` at `rank` from E[y] (`mean`, out) and Cov(y)'s eigenvectors (`vectors`, out × ≥rank)."""
    u = vectors[:, :rank].to(lin.weight.device, torch.float64)
    mu = mean.to(u.device, torch.float64)
    w1, b1 = u.T @ lin.weight.detach().double(), u.T @ _bias(lin)
    b2 = mu - u @ (u.T @ mu)
    return _fill(LowRankLinear(lin.in_features, rank, lin.out_features, act), w1, b1, u, b2, lin.weight)


@torch.no_grad()
def svd_factors(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(P, S, Qᵀ) of a weight or table, float64."""
    return torch.linalg.svd(weight.detach().double(), full_matrices=False)


@torch.no_grad()
def svd_linear(lin: nn.Linear, factors: tuple, rank: int, act: bool = False) -> LowRankLinear:
    """The `svd_w` pair of `lin` at `rank`: first = √S Qᵀ (no bias), second = P √S + b."""
    p, s, qh = factors
    root = s[:rank].sqrt()
    w1, w2 = root[:, None] * qh[:rank], p[:, :rank] * root[None, :]
    b1 = torch.zeros(rank, dtype=torch.float64)
    return _fill(LowRankLinear(lin.in_features, rank, lin.out_features, act), w1, b1, w2, _bias(lin), lin.weight)


@torch.no_grad()
def afm_table(emb: nn.Embedding, mean: torch.Tensor, vectors: torch.Tensor, rank: int) -> FactorizedEmbedding:
    """Thin table (E − 1μᵀ) U_k and projection (U_k, μ)."""
    u = vectors[:, :rank].to(emb.weight.device, torch.float64)
    mu = mean.to(u.device, torch.float64)
    out = FactorizedEmbedding(emb.num_embeddings, rank, emb.embedding_dim).to(emb.weight.device)
    out.thin.weight.copy_(((emb.weight.double() - mu) @ u).to(emb.weight.dtype))
    out.proj.weight.copy_(u.to(emb.weight.dtype))
    out.proj.bias.copy_(mu.to(emb.weight.dtype))
    return out


@torch.no_grad()
def svd_table(emb: nn.Embedding, factors: tuple, rank: int) -> FactorizedEmbedding:
    """Thin table P_k S_k and projection (Q_k, 0)."""
    p, s, qh = factors
    out = FactorizedEmbedding(emb.num_embeddings, rank, emb.embedding_dim).to(emb.weight.device)
    out.thin.weight.copy_((p[:, :rank] * s[:rank]).to(emb.weight.dtype))
    out.proj.weight.copy_(qh[:rank].T.to(emb.weight.dtype))
    out.proj.bias.zero_()
    return out


@torch.no_grad()
def merge_tables(first: nn.Linear, tables: list[nn.Module], dim: int) -> nn.Linear:
    """The Linear that reads the codes [c_1 … c_F] instead of the embeddings [e_1 … e_F] (see module docstring):
    `first` reads F·dim inputs; each table is an nn.Embedding (kept: W'_f = W_f) or a FactorizedEmbedding."""
    if first.in_features != len(tables) * dim:
        raise ValueError(f"the layer reads {first.in_features} inputs, not {len(tables)} fields x {dim}")
    w, b = first.weight.detach().double(), _bias(first)
    blocks = []
    for f, table in enumerate(tables):
        wf = w[:, f * dim : (f + 1) * dim]
        if isinstance(table, FactorizedEmbedding):
            blocks.append(wf @ table.proj.weight.detach().double())
            b = b + wf @ table.proj.bias.detach().double()
        else:
            blocks.append(wf)
    merged = torch.cat(blocks, 1)
    out = nn.Linear(merged.shape[1], first.out_features).to(first.weight.device)
    out.weight.copy_(merged.to(first.weight.dtype))
    out.bias.copy_(b.to(first.weight.dtype))
    return out
