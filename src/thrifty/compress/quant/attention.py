"""Attention quantization points without forking the upstream model.

RepQ-ViT quantizes the inputs of both attention matmuls (q, k, v and the post-softmax probabilities, the latter
with a log quantizer). Where attention is fused in `F.scaled_dot_product_attention` the probabilities never
exist as a tensor, so:

- q, k, v: an output quantizer on the projections that produce them (timm's fused `qkv` gets three segments,
  q | k | v, one scale each; BERT's `query`/`key`/`value` get one each). This works with SDPA kept fused.
- probabilities (only with `softmax_quant=True`): timm's `Attention` has its own explicit path behind the
  `fused_attn` flag; we set it False and swap `attn_drop` (identity at eval, applied right after the softmax)
  for a `SoftmaxQuant` module. Hugging Face BERT dispatches attention through `AttentionInterface`; we register
  one attention function, `"thrifty_quant"` (the eager math plus the quantizer the layer carries as
  `thrifty_softmax_quant`), and point the model's config at it. Both are module swaps or official extension
  points; the upstream forward code is untouched.
- the attention output is the input of the output projection, which is quantized like every linear input.
"""

from __future__ import annotations

import torch
from torch import nn

from thrifty.compress.quant.layers import QuantLinear, SoftmaxQuant


HF_ATTN_KEY = "thrifty_quant"
_LINEAR = (nn.Linear, QuantLinear)


def _is_timm_attention(m: nn.Module) -> bool:
    return hasattr(m, "fused_attn") and isinstance(getattr(m, "qkv", None), _LINEAR) and hasattr(m, "attn_drop")


def _is_hf_attention(m: nn.Module) -> bool:
    return all(isinstance(getattr(m, k, None), _LINEAR) for k in ("query", "key", "value")) and hasattr(m, "config")


def qkv_output_targets(model: nn.Module) -> dict[str, int]:
    """Names of the projections that produce q/k/v -> number of output segments (timm qkv: 3, BERT: 1)."""
    out: dict[str, int] = {}
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        if _is_timm_attention(m):
            out[prefix + "qkv"] = 3
        elif _is_hf_attention(m):
            out.update({prefix + k: 1 for k in ("query", "key", "value")})
    return out


def _out_quantizer(module: nn.Module, name: str):
    """The output quantizer of projection `name` when it quantizes per tensor (uint8 grid), else None."""
    layer = getattr(module, name, None)
    q = getattr(layer, "output_quantizer", None)
    return q if q is not None and q.mode == "quant" and q.segments == 1 else None


def _export_attention(module, query, key, value, attention_mask, scaling, quant):
    """The exporter's form: Q K^T and P V as `qmatmul` (integer kernels) where both operands are quantized."""
    from thrifty.compress.quant.int_ops import qmatmul

    qq, qk, qv = (_out_quantizer(module, n) for n in ("query", "key", "value"))
    k_t = key.transpose(2, 3)
    if qq is not None and qk is not None:
        scores = qmatmul(query, qq.scale[0], qq.zero_point[0], k_t, qk.scale[0], qk.zero_point[0])
    else:
        scores = torch.matmul(query, k_t)
    scores = scores * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = quant(nn.functional.softmax(scores, dim=-1))
    if quant.pv_integer and qv is not None:
        pq = quant.quantizer
        out = qmatmul(probs, pq.scale[0], pq.zero_point[0], value, qv.scale[0], qv.zero_point[0])
    else:
        out = torch.matmul(probs, value)
    return out.transpose(1, 2).contiguous(), probs


def _hf_quant_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention (as transformers' `eager_attention_forward`) with the layer's probability quantizer."""
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    quant = getattr(module, "thrifty_softmax_quant", None)
    if quant is not None and quant.export_int and quant.quant_enabled and not module.training:
        return _export_attention(module, query, key, value, attention_mask, scaling, quant)
    scores = torch.matmul(query, key.transpose(2, 3)).mul_(scaling)  # in place: the same values, no new tensor
    if attention_mask is not None:
        scores.add_(attention_mask)
    probs = nn.functional.softmax(scores, dim=-1)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    if quant is not None:
        probs = quant(probs)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return out, probs


def register_hf_attention() -> None:
    """Register `"thrifty_quant"` with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(HF_ATTN_KEY, _hf_quant_attention)
    AttentionMaskInterface.register(HF_ATTN_KEY, eager_mask)


def attach_softmax_quant(model: nn.Module, log2: bool = True, observer_samples: int = 2**18) -> list[str]:
    """Insert a `SoftmaxQuant` after every exposed attention softmax; returns the names of the new modules."""
    names: list[str] = []
    hf_configs = []
    for name, m in list(model.named_modules()):
        prefix = f"{name}." if name else ""
        if _is_timm_attention(m) and not isinstance(m.attn_drop, SoftmaxQuant):
            m.fused_attn = False  # timm's own explicit attention path
            m.attn_drop = SoftmaxQuant(m.attn_drop, log2, observer_samples)
            names.append(prefix + "attn_drop")
        elif _is_hf_attention(m) and not hasattr(m, "thrifty_softmax_quant"):
            m.thrifty_softmax_quant = SoftmaxQuant(None, log2, observer_samples)
            names.append(prefix + "thrifty_softmax_quant")
            hf_configs.append(m.config)
    if hf_configs:
        register_hf_attention()
        for cfg in hf_configs:
            cfg._attn_implementation = HF_ATTN_KEY
    return names
