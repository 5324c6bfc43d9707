"""Streamed calibration statistics: per attention layer, the float64 second-moment matrices of the key and value
caches, C = (1/n) sum_t k_t^T k_t (h*d x h*d, k_t the concatenated heads of token t), over real tokens only.

No (n x h*d) matrix of all tokens is ever kept: each batch's (B, T, h*d) projection output is masked to its real
tokens and added to the running sum, so memory is O((h*d)^2) per layer whatever the calibration size. The top
eigenvectors of C are the top right singular vectors of the cache matrix (SVD-a), and C's sub-blocks serve every
group, the complex per-frequency fit and the similarity grouping.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from thrifty.compress.calibration import iter_inputs
from thrifty.compress.kv_heads.sites import AttentionSite
from thrifty.errors import ConfigError


class StreamingGram:
    """Running (1/n) sum x^T x over the rows x of every `update`, accumulated in float64."""

    def __init__(self, dim: int):
        self.sum = torch.zeros(dim, dim, dtype=torch.float64)
        self.count = 0

    def update(self, rows: torch.Tensor) -> None:
        """rows: (N, dim)."""
        if rows.shape[0] == 0:
            return
        x = rows.detach().to(device="cpu", dtype=torch.float64)
        self.sum.addmm_(x.T, x)
        self.count += int(x.shape[0])

    @property
    def matrix(self) -> torch.Tensor:
        """(dim, dim) mean second moment (zeros before any update)."""
        return self.sum / max(self.count, 1)


def rotate_half_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, d) rotated by RoPE in transformers' rotate-half layout: pair (m, m + d/2) turns by t*theta_m.
    cos/sin: (B, T, d) as the model's rotary embedding returns them."""
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * c + rotated * s


def model_rope(site: AttentionSite) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The upstream model's own `apply_rotary_pos_emb` (applied to keys) when its module defines one."""
    fn = getattr(sys.modules.get(type(site.module).__module__), "apply_rotary_pos_emb", None)
    if fn is None:
        return rotate_half_rope
    return lambda k, cos, sin: fn(k, k, cos, sin)[1]


class KVStatistics:
    """Hooks that stream the k/v projection outputs of every site into `StreamingGram`s.

    `keys[i]`, `values[i]`: pre-RoPE caches of site i; `post_rope_keys[i]` (when asked for): keys after RoPE, with
    the positions the model itself used. Set `mask` ((B, T) bool, real tokens) before each forward pass.
    """

    def __init__(self, sites: list[AttentionSite], post_rope: bool = False):
        self.sites = sites
        self.keys = [StreamingGram(s.num_kv_heads * s.head_dim) for s in sites]
        self.values = [StreamingGram(s.num_kv_heads * s.head_dim) for s in sites]
        self.post_rope_keys = [
            StreamingGram(s.num_kv_heads * s.head_dim) if post_rope and s.rope else None for s in sites
        ]
        self.mask: torch.Tensor | None = None
        self._rope: dict[int, Any] = {}
        self._handles: list[Any] = []

    def _rows(self, out: torch.Tensor) -> torch.Tensor:
        out = out.detach()
        if self.mask is None:
            return out.reshape(-1, out.shape[-1])
        return out[self.mask.to(out.device)]

    def attach(self) -> KVStatistics:
        for i, site in enumerate(self.sites):
            self._handles.append(site.linear("k").register_forward_hook(self._key_hook(i)))
            self._handles.append(site.linear("v").register_forward_hook(self._value_hook(i)))
            if self.post_rope_keys[i] is not None:
                self._handles.append(site.module.register_forward_pre_hook(self._rope_hook(i), with_kwargs=True))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._rope.clear()

    def _rope_hook(self, i: int):
        def hook(module, args, kwargs):
            pe = kwargs.get("position_embeddings")
            if pe is None:
                raise ConfigError(
                    f"attention {self.sites[i].name!r} was called without `position_embeddings`; the post_rope "
                    "strategy needs a transformers version whose decoder layers pass them (>= 4.48)"
                )
            self._rope[i] = pe

        return hook

    def _key_hook(self, i: int):
        site = self.sites[i]
        rope = model_rope(site) if site.rope else None

        def hook(module, args, out):
            self.keys[i].update(self._rows(out))
            gram = self.post_rope_keys[i]
            if gram is not None:
                cos, sin = self._rope[i]
                b, t, _ = out.shape
                k = out.detach().view(b, t, site.num_kv_heads, site.head_dim).transpose(1, 2)
                k = rope(k, cos, sin).transpose(1, 2).reshape(b, t, -1)
                gram.update(self._rows(k))

        return hook

    def _value_hook(self, i: int):
        def hook(module, args, out):
            self.values[i].update(self._rows(out))

        return hook

    @property
    def tokens(self) -> int:
        return self.keys[0].count if self.keys else 0


def _limit_tokens(mask: torch.Tensor, left: int | None) -> torch.Tensor:
    """Keep the first `left` real tokens of `mask` (row-major), drop the rest."""
    if left is None:
        return mask
    flat = mask.reshape(-1)
    keep = flat & (torch.cumsum(flat.long(), 0) <= left)
    return keep.view_as(mask)


MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


def default_forward(model: nn.Module) -> Callable[[Any], Any]:
    """How calibration runs `model`: a thrifty Backbone takes its input dict; a transformers model runs its base
    model (no LM/classification head, whose output nobody needs here) with the dict as keyword arguments."""
    from thrifty.backbones.base import Backbone

    backbone = getattr(model, "backbone", None)  # a TunedModel: its backbone runs every attention layer
    if isinstance(backbone, Backbone):
        model = backbone
    if isinstance(model, Backbone):
        return model
    body = getattr(model, "base_model", model)

    def run(inputs: Any) -> Any:
        if isinstance(inputs, dict):  # labels and other training keys are not model inputs here
            return body(**{k: v for k, v in inputs.items() if k in MODEL_INPUTS})
        return body(input_ids=inputs)

    return run


@torch.no_grad()
def collect_statistics(
    model: nn.Module,
    sites: list[AttentionSite],
    batches: Iterable[Any],
    *,
    calib_samples: int | None = None,
    calib_tokens: int | None = None,
    post_rope: bool = False,
    forward: Callable[[Any], Any] | None = None,
    progress: bool = False,
) -> tuple[KVStatistics, dict[str, Any]]:
    """Stream calibration batches (dicts with `input_ids` and `attention_mask`, or (B, T) id tensors, or
    (inputs, labels) pairs) through `model`; returns the statistics and a description of what was seen."""
    if batches is None:
        raise ConfigError("this kv_heads config fits on activations; pass calibration batches (token id batches)")
    run = forward or default_forward(model)
    stats = KVStatistics(sites, post_rope=post_rope).attach()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    samples = seq_len = 0
    try:
        bar = tqdm(desc="kv_heads calibration", unit="tok", total=calib_tokens, disable=not progress, leave=False)
        for inputs in iter_inputs(batches, calib_samples):
            ids = inputs["input_ids"] if isinstance(inputs, dict) else inputs
            mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
            mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
            left = None if calib_tokens is None else calib_tokens - stats.tokens
            stats.mask = _limit_tokens(mask, left)
            if isinstance(inputs, dict):
                inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
            else:
                inputs = inputs.to(device)
            before = stats.tokens
            run(inputs)
            samples += int(ids.shape[0])
            seq_len = max(seq_len, int(ids.shape[1]))
            bar.update(stats.tokens - before)
            if calib_tokens is not None and stats.tokens >= calib_tokens:
                break
        bar.close()
    finally:
        stats.detach()
        stats.mask = None
        model.train(was_training)
    if stats.tokens == 0:
        raise ConfigError("kv_heads calibration saw no real tokens; pass non-empty batches with attention_mask")
    return stats, {"samples": samples, "tokens": stats.tokens, "max_seq_len": seq_len}
