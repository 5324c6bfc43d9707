"""Losses of the long-tail baselines and of BTM. `targets` are class indices (B,) or soft labels (B, C) (mixup,
label smoothing); every loss below is linear in a soft target, so mixup's `lam * L(y_a) + (1 - lam) * L(y_b)`
(MiSLAS `mixup_criterion`) equals the loss of the mixed one-hot target.

- `ce`: cross-entropy.
- `cb`: class-balanced re-weighting by the effective number (Cui et al. 2019): w_c = (1 - beta) / (1 - beta^n_c),
  normalised to sum C; loss = mean_i sum_c t_ic w_c (-log p_ic) (Cui's reference code divides by the batch size,
  not by the summed weights as torch's weighted CE does).
- `logit_adjust`: logit-adjusted loss (Menon et al. 2021) CE(z + tau log pi, y), pi_c = n_c / N; tau = 1 is
  Balanced Softmax (Ren et al. 2020, CE(z + log n_c)). Inference uses the plain logits.
- `las`: MiSLAS label-aware smoothing, eps_c from the class count (`las_epsilon`);
  loss = mean_i [(1 - eps_y) (-log p_y) + eps_y mean_k (-log p_k)].
- `gml`: BTM/GML `ReweightedGMLLogAfterMean` (longtail-ssl.md §1.3): q = softmax(z + log n), clamped to
  [1e-5, 1]; per class c in the batch l_c = -log(mean_{i: y_i = c} q_ic); L = (mean_c l_c^p)^(1/p).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from thrifty.errors import ConfigError


def soft_targets(targets: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """(B,) class indices or (B, C) soft labels -> (B, C) float, with label smoothing t(1 - s) + s / C."""
    t = targets.float() if targets.ndim == 2 else F.one_hot(targets, num_classes).float()
    return t * (1.0 - smoothing) + smoothing / num_classes if smoothing else t


def class_balanced_weights(counts: np.ndarray, beta: float) -> torch.Tensor:
    """(C,) effective-number weights (1 - beta) / (1 - beta^n_c), normalised to sum C (Cui et al. 2019 eq. 3)."""
    n = np.asarray(counts, np.float64)
    w = (1.0 - beta) / (1.0 - np.power(beta, n))
    return torch.tensor(w / w.sum() * len(n), dtype=torch.float32)


def weighted_soft_ce(logits: torch.Tensor, t: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """mean_i sum_c t_ic w_c (-log softmax(logits)_ic)."""
    logp = F.log_softmax(logits.float(), -1)
    if weights is not None:
        t = t * weights.to(t.device)
    return -(t * logp).sum(-1).mean()


def log_prior(counts: np.ndarray, device: torch.device) -> torch.Tensor:
    """log pi_c = log(n_c / N), (C,)."""
    n = torch.tensor(np.asarray(counts, np.float64), dtype=torch.float32, device=device)
    return torch.log(n / n.sum())


def las_epsilon(counts: np.ndarray, head: float, tail: float, shape: str = "concave") -> np.ndarray:
    """MiSLAS `LabelAwareSmoothing`: eps_c from n_c between the tail (n_min) and head (n_max) values.
    concave: tail + (head - tail) sin(pi/2 (n_c - n_min) / (n_max - n_min)); linear: the straight line;
    convex: head + (head - tail) sin(3pi/2 + pi/2 (n_c - n_min) / (n_max - n_min))."""
    n = np.asarray(counts, np.float64)
    span = max(n.max() - n.min(), 1e-12)
    x = (n - n.min()) / span
    if shape == "concave":
        return tail + (head - tail) * np.sin(x * np.pi / 2)
    if shape == "linear":
        return tail + (head - tail) * x
    if shape == "convex":
        return head + (head - tail) * np.sin(1.5 * np.pi + x * np.pi / 2)
    raise ConfigError(f"smoothing shape must be concave, linear or convex, got {shape!r}")


def las_loss(logits: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Label-aware smoothing with soft targets: sum_c t_c [(1 - eps_c)(-log p_c) + eps_c mean_k(-log p_k)]."""
    logp = F.log_softmax(logits.float(), -1)
    eps = eps.to(logits.device)
    nll = -(t * (1.0 - eps) * logp).sum(-1)
    smooth = (t * eps).sum(-1) * (-logp.mean(-1))
    return (nll + smooth).mean()


def gml_loss(logits: torch.Tensor, labels: torch.Tensor, counts: np.ndarray, p: float = 1.0) -> torch.Tensor:
    """Re-weighted generalized mean loss, log after mean (see module docstring); `labels` must be hard (B,)."""
    if labels.ndim != 1:
        raise ConfigError("the GML loss needs hard labels: turn mixup and label smoothing off")
    z = logits.float() + torch.log(torch.tensor(np.asarray(counts, np.float64), device=logits.device)).float()
    q = F.softmax(z, -1).clamp(1e-5, 1.0)
    q_true = q.gather(1, labels[:, None]).squeeze(1)  # (B,)
    classes, inverse = torch.unique(labels, return_inverse=True)
    sums = torch.zeros(len(classes), device=logits.device).index_add_(0, inverse, q_true)
    sizes = torch.zeros(len(classes), device=logits.device).index_add_(0, inverse, torch.ones_like(q_true))
    per_class = -torch.log(sums / sizes)
    return per_class.pow(p).mean().pow(1.0 / p)


def mixup(inputs, t: torch.Tensor, alpha: float, rng: np.random.Generator):
    """Input mixup (Zhang et al. 2018; MiSLAS `mixup_data`): lam ~ Beta(alpha, alpha), a random pairing; floating
    tensors (images, or a dict of cached float features) are mixed, t (B, C) becomes lam t + (1 - lam) t[perm]."""
    lam = float(rng.beta(alpha, alpha))
    perm = torch.from_numpy(rng.permutation(len(t))).to(t.device)

    def mix(x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():
            raise ConfigError(
                "mixup mixes floating inputs (images, or cached features of a side method: train with --cache); "
                "token ids cannot be mixed: use mixup=0 for text inputs"
            )
        return lam * x + (1.0 - lam) * x[perm]

    mixed = {k: mix(v) for k, v in inputs.items()} if isinstance(inputs, dict) else mix(inputs)
    return mixed, lam * t + (1.0 - lam) * t[perm]
