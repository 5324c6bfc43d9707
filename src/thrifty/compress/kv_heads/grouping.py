"""Which KV heads share a merged head (the paper's grouping policy is NOT FOUND, compression.md §4.2).

* `consecutive` (default, the spec's assumption): heads [c*g, (c+1)*g) form group c. On a GQA decoder this keeps
  the query heads in place (query head i still reads group i // (H / K)).
* `similarity` (our option): greedy groups of heads whose caches are most linearly related, measured by the
  uncentred RV coefficient ||C_hh'||_F^2 / (||C_hh||_F ||C_h'h'||_F) of the cross second-moment blocks, averaged
  over keys and values. Starting from the lowest-numbered free head, each group adds the free head with the highest
  mean similarity to its members until it has g heads. On a decoder the query heads are then permuted (q_proj rows,
  o_proj columns) so that each group's query heads are contiguous, as `repeat_kv` expects.
"""

from __future__ import annotations

import torch


def consecutive_groups(num_heads: int, num_groups: int) -> list[list[int]]:
    g = num_heads // num_groups
    return [list(range(c * g, (c + 1) * g)) for c in range(num_groups)]


def rv_similarity(gram: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """(h, h) uncentred RV coefficients between the heads of a (h*d, h*d) second-moment matrix (1 on the diagonal)."""
    c = gram.to(torch.float64).reshape(num_heads, head_dim, num_heads, head_dim).permute(0, 2, 1, 3)
    sq = (c**2).sum((-1, -2))  # ||C_hh'||_F^2
    norm = sq.diagonal().sqrt()
    return sq / (norm[:, None] * norm[None, :]).clamp_min(1e-300)


def similarity_groups(similarity: torch.Tensor, num_groups: int) -> list[list[int]]:
    """Greedy balanced grouping on a symmetric (h, h) similarity (module docstring); groups sorted, in order of
    their first head."""
    h = similarity.shape[0]
    g = h // num_groups
    free = list(range(h))
    groups = []
    while free:
        group = [free.pop(0)]
        while len(group) < g:
            scores = [float(similarity[j, group].mean()) for j in free]
            group.append(free.pop(max(range(len(free)), key=scores.__getitem__)))
        groups.append(sorted(group))
    return groups


def make_groups(
    grouping: str,
    num_heads: int,
    num_groups: int,
    head_dim: int,
    grams: list[torch.Tensor] | None = None,
) -> list[list[int]]:
    """Groups of KV head indices; `grams` (the layer's key/value second moments) are read by `similarity`."""
    if grouping == "consecutive":
        return consecutive_groups(num_heads, num_groups)
    if not grams:
        raise ValueError("similarity grouping needs calibration statistics")
    sim = sum(rv_similarity(c, num_heads, head_dim) for c in grams) / len(grams)
    return similarity_groups(sim, num_groups)
