"""Rank per target from the config's rule (`rank`, `energy`, or a global parameter budget).

A target is a Linear layer or a field table; `spectrum` is what its rank keeps (AFM: the eigenvalues of Cov(y);
svd_w: the squared singular values of the weight), descending. A rank of None keeps the layer dense. Global rules
search one knob against the exact parameter count of the compressed model (`total_params`):

- allocation "energy": a common threshold τ; each target keeps its smallest rank holding τ of its spectrum;
  the largest τ that fits wins (binary search);
- allocation "sensitivity": D_t(k) = output distortion on the proxy set with only target t at rank k (measured by
  the caller for a grid of ranks); each target picks argmin_k D_t(k) + λ·params_t(k) and λ is searched so that the
  model fits (Lagrangian relaxation of  min Σ D_t  s.t.  params ≤ budget).
A factorization that does not save parameters is never chosen by the energy and global rules (the layer stays dense).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from thrifty.compress.afm.factor import linear_params, table_params
from thrifty.compress.afm.stats import energy_rank
from thrifty.errors import ConfigError


@dataclass
class Target:
    """One factorizable layer. `kind` 'linear' (in_features, out_features) or 'table' (rows n, dim d)."""

    name: str
    kind: str
    rows: int  # in_features | num_embeddings
    dim: int  # out_features | embedding_dim
    max_rank: int
    spectrum: torch.Tensor
    projection: bool = True  # tables: the projection stays (something reads the full embedding)
    bias: bool = True
    extra: dict = field(default_factory=dict)  # factors, statistics

    def params(self, rank: int | None) -> int:
        if self.kind == "linear":
            return linear_params(self.rows, self.dim, rank, self.bias)
        return table_params(self.rows, self.dim, rank, self.projection)

    def saving(self, rank: int | None) -> int | None:
        """`rank` if it saves parameters, else None (dense)."""
        if rank is None or rank >= self.max_rank or self.params(rank) >= self.params(None):
            return None
        return rank


@dataclass
class Merge:
    """The Linear reading the flattened tables (H outputs) and the target name of that Linear, if any: merging
    changes its input width from F·d to Σ k_f, so its parameter count depends on the table ranks."""

    outputs: int
    dim: int
    tables: list[str]
    first_target: str | None = None


def total_params(assign: dict[str, int | None], targets: list[Target], fixed: int, merge: Merge | None) -> int:
    """Parameters of the compressed model: `fixed` (everything not a target) + each target at its rank, with the
    merged first layer's input width adjusted to the table ranks."""
    total = fixed + sum(t.params(assign.get(t.name)) for t in targets)
    if merge is not None:
        rows = merge.outputs
        if merge.first_target is not None and assign.get(merge.first_target) is not None:
            rows = assign[merge.first_target]
        total += rows * sum((assign.get(n) or merge.dim) - merge.dim for n in merge.tables)
    return total


def fixed_ranks(targets: list[Target], rank: int | None, embed_rank: int | None) -> dict[str, int | None]:
    """`rank` for every Linear target, `embed_rank` for every table (None: tables stay); a rank beyond a target's
    largest raises ConfigError."""
    out: dict[str, int | None] = {}
    for t in targets:
        r = rank if t.kind == "linear" else embed_rank
        if r is not None and r > t.max_rank:
            what = "out_features" if t.kind == "linear" else "the embedding dim"
            raise ConfigError(
                f"rank {r} does not fit {t.name}: at most {t.max_rank} ({what}); lower `rank`/`embed_rank` or use "
                "`energy`/`budget`"
            )
        out[t.name] = r
    return out


def energy_ranks(targets: list[Target], energy: float) -> dict[str, int | None]:
    return {t.name: t.saving(energy_rank(t.spectrum, energy)) for t in targets}


def budget_params(targets: list[Target], fixed: int, budget: float | None, size_ratio: float | None) -> int:
    """The parameter count the compressed model must reach."""
    if budget is not None:
        return fixed + int(budget * sum(t.params(None) for t in targets))
    return int((fixed + sum(t.params(None) for t in targets)) / size_ratio)


def _fits_or_raise(assign, targets, fixed, merge, goal: int) -> None:
    smallest = total_params(assign, targets, fixed, merge)
    if smallest > goal:
        raise ConfigError(
            f"the parameter budget ({goal:,d}) is below the smallest model these targets allow ({smallest:,d}, "
            "every target at rank 1); raise `budget`, lower `size_ratio`, or target more layers"
        )


def global_energy_ranks(targets: list[Target], fixed: int, merge: Merge | None, goal: int) -> dict[str, int | None]:
    """Largest common energy threshold τ whose ranks fit `goal` parameters."""
    _fits_or_raise({t.name: t.saving(1) for t in targets}, targets, fixed, merge, goal)
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if total_params(energy_ranks(targets, mid), targets, fixed, merge) <= goal:
            lo = mid
        else:
            hi = mid
    return energy_ranks(targets, lo) if lo > 0 else {t.name: t.saving(1) for t in targets}


def candidate_ranks(t: Target) -> list[int]:
    """Ranks scored for sensitivity: quantiles of the spectrum's energy and fractions of the largest rank."""
    ks = {energy_rank(t.spectrum, e) for e in (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995)}
    ks |= {max(1, round(t.max_rank * f)) for f in (1 / 32, 1 / 16, 1 / 8, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4)}
    return sorted(k for k in ks if t.saving(k) is not None)


def sensitivity_ranks(
    targets: list[Target],
    fixed: int,
    merge: Merge | None,
    goal: int,
    score: Callable[[Target, int], float],
) -> tuple[dict[str, int | None], dict[str, dict[int, float]]]:
    """Lagrangian allocation over measured distortions (see module docstring); returns ranks and the scores."""
    from tqdm.auto import tqdm

    grid = {t.name: candidate_ranks(t) for t in targets}
    bar = tqdm(total=sum(map(len, grid.values())), desc="afm sensitivity", leave=False, mininterval=10.0)
    scores: dict[str, dict[int, float]] = {}
    for t in targets:
        scores[t.name] = {}
        for k in grid[t.name]:
            scores[t.name][k] = float(score(t, k))
            bar.update(1)
    bar.close()
    options = {
        t.name: [(None, 0.0, t.params(None))] + [(k, d, t.params(k)) for k, d in scores[t.name].items()]
        for t in targets
    }
    smallest = {t.name: min(options[t.name], key=lambda o: (o[2], o[1]))[0] for t in targets}
    _fits_or_raise(smallest, targets, fixed, merge, goal)

    def pick(lam: float) -> dict[str, int | None]:
        return {name: min(opts, key=lambda o: o[1] + lam * o[2])[0] for name, opts in options.items()}

    if total_params(pick(0.0), targets, fixed, merge) <= goal:
        return pick(0.0), scores
    lo, hi = 0.0, 1e-12
    while total_params(pick(hi), targets, fixed, merge) > goal and hi < 1e6:
        hi *= 4
    if total_params(pick(hi), targets, fixed, merge) > goal:
        return smallest, scores
    for _ in range(80):
        mid = (lo + hi) / 2
        if total_params(pick(mid), targets, fixed, merge) <= goal:
            hi = mid
        else:
            lo = mid
    return pick(hi), scores
