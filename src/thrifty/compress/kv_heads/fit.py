"""Per-group merges of KV heads: a projection E and per-head expansions B_h (compression.md §4.2, [DERIVED]).

For a group G of g heads of dim d, with k_G (1, g*d) a token's concatenated cache of the group (row vectors):

    shared head   u   = k_G E                 E: (g*d, d)
    head h        k_h ~ u B_h^T               B_h: (d, d)

so R = E [B_1; ...; B_g]^T (g*d, g*d) is the reconstruction map and the relative error on calibration tokens is
tr((I - R)^T C (I - R)) / tr(C), C = (1/n) sum k_G^T k_G. Every strategy is a choice of (E, B):

* `full` (SVD-a on C, SVD-w on W W^T): E = P, the top-d eigenvectors of the Gram (top right singular vectors of
  the cache / top left singular vectors of the stacked weights), B_h = P_h, P's d rows of head h (the paper's
  `V_h ~ (X W_{V,G} P) P_h^T`).
* `complex` (our design for RoPE keys; the paper's is NOT FOUND): P constrained so that each P_h acts on every
  RoPE frequency pair (m, m + d/2) as one complex scalar, i.e. a 2x2 block [[a, b], [-b, a]]. A complex scalar
  commutes with the rotation e^{i t theta_m} RoPE applies to that pair, so Rot_t(u B_h^T) = Rot_t(u) B_h^T for
  every position t and the fold into the queries stays exact under RoPE. Writing z_{h,m} = k[m] + i k[m + d/2],
  the constrained problem splits into one rank-1 complex PCA per frequency across the group's heads: with
  M_m = sum_t z_t^H z_t (g x g Hermitian, read off C's entries) and v its top unit eigenvector, the shared
  coordinate is u_m = sum_h z_{h,m} v_h and head h's is u_m conj(v_h). Because |e^{i t theta}| = 1 the error on
  pre-RoPE keys equals the error on post-RoPE keys, so fitting before RoPE is fitting what attention sees.
* `mean` (GQA paper mean pooling): E = [I; ...; I] / g, B_h = I; commutes with RoPE too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Merge:
    """One group's merge: `project` E (g*d, d), `expand` (g, d, d) stacking B_h; float64."""

    project: torch.Tensor
    expand: torch.Tensor

    @property
    def reconstruction(self) -> torch.Tensor:
        """R = E [B_1; ...; B_g]^T, (g*d, g*d): k_G_hat = k_G R."""
        g, d, _ = self.expand.shape
        return self.project @ self.expand.reshape(g * d, d).T

    def relative_error(self, gram: torch.Tensor) -> float:
        """tr((I - R)^T C (I - R)) / tr(C) for the group's second-moment matrix C."""
        resid = torch.eye(gram.shape[0], dtype=torch.float64) - self.reconstruction
        total = float(torch.trace(gram))
        return max(0.0, float(torch.trace(resid.T @ gram @ resid)) / total) if total > 0 else 0.0


def group_gram(gram: torch.Tensor, group: list[int], head_dim: int) -> torch.Tensor:
    """The (g*d, g*d) sub-block of a layer's (h*d, h*d) Gram for the heads of `group`, in group order."""
    idx = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in group])
    return gram[idx][:, idx]


def weight_gram(weight: torch.Tensor, bias: torch.Tensor | None, group: list[int], head_dim: int) -> torch.Tensor:
    """SVD-w's Gram: W_G W_G^T of the group's stacked projection rows (g*d, D), the bias as one more column."""
    w = weight.detach().to(device="cpu", dtype=torch.float64)
    if bias is not None:
        w = torch.cat([w, bias.detach().to(device="cpu", dtype=torch.float64)[:, None]], dim=1)
    w = torch.cat([w[h * head_dim : (h + 1) * head_dim] for h in group])
    return w @ w.T


def _blocks(p: torch.Tensor, g: int) -> torch.Tensor:
    d = p.shape[1]
    return p.reshape(g, d, d).clone()


def fit_full(gram: torch.Tensor, g: int, head_dim: int) -> Merge:
    """E = P = top-`head_dim` eigenvectors of the (g*d, g*d) Gram, B_h = P_h."""
    evals, evecs = torch.linalg.eigh(gram.to(torch.float64))
    p = evecs[:, torch.argsort(evals, descending=True)[:head_dim]].contiguous()
    return Merge(p, _blocks(p, g))


def complex_gram(gram: torch.Tensor, g: int, head_dim: int) -> torch.Tensor:
    """(d/2, g, g) Hermitian M_m[h, h'] = sum_t conj(z_{h,m}) z_{h',m}, z_{h,m} = k_h[m] + i k_h[m + d/2],
    read from the real Gram: Re = C[r_h, r_h'] + C[i_h, i_h'], Im = C[r_h, i_h'] - C[i_h, r_h']."""
    half = head_dim // 2
    c = gram.to(torch.float64).reshape(g, 2, half, g, 2, half)  # [head, re/im, m, head', re/im, m']
    m = torch.arange(half)
    c = c[:, :, m, :, :, m]  # (half, g, 2, g, 2): the diagonal m == m'
    real = c[:, :, 0, :, 0] + c[:, :, 1, :, 1]
    imag = c[:, :, 0, :, 1] - c[:, :, 1, :, 0]
    return torch.complex(real, imag)


def complex_projection(v: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Real (g*d, d) P of per-frequency complex weights v (d/2, g): u_m = sum_h z_{h,m} v_{h,m}, i.e. head h's
    pair (m, m + d/2) maps through [[Re v, Im v], [-Im v, Re v]] (rows: re, im of z; columns: re, im of u)."""
    half, g = v.shape
    p = torch.zeros(g, 2, half, 2, half, dtype=torch.float64)
    m = torch.arange(half)
    re, im = v.real.T, v.imag.T  # (g, half): p[:, s, m, s', m] has the ints and m adjacent, so (g, half)
    p[:, 0, m, 0, m] = re
    p[:, 0, m, 1, m] = im
    p[:, 1, m, 0, m] = -im
    p[:, 1, m, 1, m] = re
    return p.reshape(g * head_dim, head_dim)


def fit_complex(gram: torch.Tensor, g: int, head_dim: int) -> Merge:
    """Rank-1 complex PCA per RoPE frequency (module docstring); E = P, B_h = P_h, and P^T P = I."""
    if head_dim % 2:
        raise ValueError(f"RoPE head_dim must be even, got {head_dim}")
    _, evecs = torch.linalg.eigh(complex_gram(gram, g, head_dim))  # ascending
    v = evecs[:, :, -1]  # (d/2, g) unit top eigenvectors
    p = complex_projection(v, head_dim)
    return Merge(p, _blocks(p, g))


def fit_mean(g: int, head_dim: int) -> Merge:
    """GQA mean pooling: u = mean_h k_h, k_h ~ u."""
    eye = torch.eye(head_dim, dtype=torch.float64)
    return Merge(eye.repeat(g, 1) / g, eye.expand(g, head_dim, head_dim).clone())


def fit(structure: str, gram: torch.Tensor | None, g: int, head_dim: int) -> Merge:
    """Dispatch: structure in full | post_rope (= full on a post-RoPE or weight Gram) | complex | mean."""
    if structure == "mean":
        return fit_mean(g, head_dim)
    if gram is None:
        raise ValueError(f"structure {structure!r} needs a Gram matrix")
    if structure == "complex":
        return fit_complex(gram, g, head_dim)
    return fit_full(gram, g, head_dim)
