"""Weight-space merging of models fine-tuned from one start (BTM merge.py).

    uniform:  theta = (1/M) sum_m theta_m          every tensor: weights, biases, BatchNorm running mean/var
    greedy:   candidates sorted by their own score (best first); soup_1 = the best; candidate m joins when
              score(n/(n+1) soup_n + 1/(n+1) theta_m) >= score(soup_n)  (BTM `model_scoup`, "add if G-mean improves")

Averages are computed in float64 and cast back, so averaging M identical models gives them back bit for bit.
Integer buffers (BatchNorm `num_batches_tracked`) get the floor of the mean, which is what BTM's float sum copied
into an int64 buffer gives for non-negative counts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from thrifty.errors import CheckpointError


State = dict[str, torch.Tensor]


def average_states(states: Sequence[State], weights: Sequence[float] | None = None) -> State:
    """sum_m w_m state_m for every key (w = 1/M by default); every state must have the same keys and shapes."""
    if not states:
        raise CheckpointError("nothing to average: no model states given")
    weights = [1.0 / len(states)] * len(states) if weights is None else list(weights)
    if len(weights) != len(states):
        raise CheckpointError(f"{len(weights)} weights for {len(states)} states")
    keys = set(states[0])
    for i, s in enumerate(states[1:], 1):
        if set(s) != keys:
            diff = sorted(keys ^ set(s))[:3]
            raise CheckpointError(f"state {i} has other tensors than state 0 ({diff}); merge models of one recipe")
    out = {}
    for k in states[0]:
        ref = states[0][k]
        if any(s[k].shape != ref.shape for s in states):
            raise CheckpointError(f"{k}: shapes differ between the states; merge models of one architecture")
        acc = sum(w * s[k].detach().double() for w, s in zip(weights, states))
        out[k] = acc.to(ref.dtype) if ref.is_floating_point() else torch.floor(acc).to(ref.dtype)
    return out


def greedy_soup(states: Sequence[State], score: Callable[[State], float]) -> tuple[State, list[int], list[float]]:
    """Greedy soup (module docstring): returns (soup state, indices of the members used, scores of each single)."""
    singles = [float(score(s)) for s in states]
    order = sorted(range(len(states)), key=lambda i: -singles[i])
    soup, used, best = dict(states[order[0]]), [order[0]], singles[order[0]]
    for i in order[1:]:
        n = len(used)
        trial = average_states([soup, states[i]], [n / (n + 1), 1 / (n + 1)])
        value = float(score(trial))
        if value >= best:
            soup, best = trial, value
            used.append(i)
    return soup, used, singles
