"""Find the self-attention layers whose KV heads can be merged, and describe their head layout.

Two families, each read from the upstream module without forking it:

* Llama-style decoders (transformers `LlamaAttention`, `Qwen2Attention`, `MistralAttention`, ...): separate
  `q_proj` (H*d, D), `k_proj`/`v_proj` (Hkv*d, D), `o_proj` (D, H*d); query head i reads KV head i // (H / Hkv)
  (transformers' `repeat_kv`); keys go through RoPE in the rotate-half layout (pair (m, m + d/2) rotates by t*theta_m).
* BERT-style encoders (`BertAttention`: `self.query/key/value` (D, D) and `output.dense`): full MHA, no RoPE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from thrifty.errors import ConfigError


LLAMA_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class AttentionSite:
    """One self-attention layer. `module` is the attention module (Llama) or `BertAttention`; q/k/v/o are read
    through the parent/attribute pairs so that fold.py can swap the Linear modules."""

    name: str
    family: str  # "llama" | "bert"
    module: nn.Module
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope: bool

    @property
    def qkv_parent(self) -> nn.Module:
        return self.module if self.family == "llama" else self.module.self

    @property
    def o_parent(self) -> nn.Module:
        return self.module if self.family == "llama" else self.module.output

    def attr(self, which: str) -> str:
        """Attribute name of projection `which` in q | k | v | o."""
        if self.family == "llama":
            return f"{which}_proj"
        return {"q": "query", "k": "key", "v": "value", "o": "dense"}[which]

    def linear(self, which: str) -> nn.Linear:
        parent = self.o_parent if which == "o" else self.qkv_parent
        return getattr(parent, self.attr(which))

    @property
    def queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads


def _is_linear(m: object) -> bool:
    return isinstance(m, nn.Linear)


def _llama_site(name: str, m: nn.Module, config) -> AttentionSite:
    head_dim = int(getattr(m, "head_dim", 0) or getattr(config, "head_dim", 0) or 0)
    if head_dim <= 0:
        raise ConfigError(f"attention {name!r} has q/k/v/o projections but no `head_dim`; cannot split its heads")
    heads, kv = m.q_proj.out_features // head_dim, m.k_proj.out_features // head_dim
    if kv * head_dim != m.k_proj.out_features or m.v_proj.out_features != m.k_proj.out_features or heads % kv:
        raise ConfigError(
            f"attention {name!r}: k_proj/v_proj sizes {m.k_proj.out_features}/{m.v_proj.out_features} are not "
            f"whole heads of {head_dim} that divide the {heads} query heads"
        )
    partial = float(getattr(config, "partial_rotary_factor", 1.0) or 1.0) if config is not None else 1.0
    if partial != 1.0:
        raise ConfigError(
            f"attention {name!r}: partial rotary embeddings (partial_rotary_factor={partial}) are not supported; "
            "only full-dimension rotate-half RoPE (Llama, Qwen2, Mistral)"
        )
    return AttentionSite(name, "llama", m, heads, kv, head_dim, rope=True)


def _bert_site(name: str, m: nn.Module, config) -> AttentionSite:
    att = m.self
    heads = int(getattr(att, "num_attention_heads", 0) or getattr(config, "num_attention_heads", 0))
    head_dim = int(getattr(att, "attention_head_size", 0) or att.query.out_features // max(heads, 1))
    if heads <= 0 or heads * head_dim != att.key.out_features:
        raise ConfigError(f"attention {name!r}: cannot read its number of heads")
    if getattr(m, "is_cross_attention", False) or getattr(att, "is_cross_attention", False):
        raise ConfigError(f"attention {name!r} is cross-attention; only self-attention KV heads can be merged")
    pos = getattr(att, "position_embedding_type", None) or getattr(config, "position_embedding_type", "absolute")
    if pos not in (None, "absolute"):
        raise ConfigError(
            f"attention {name!r} uses position_embedding_type={pos!r}, whose scores read the raw keys; "
            "only absolute position embeddings are supported"
        )
    return AttentionSite(name, "bert", m, heads, heads, head_dim, rope=False)


def find_attention_sites(model: nn.Module) -> list[AttentionSite]:
    """All self-attention layers of `model` in module order; ConfigError if there is none."""
    config = getattr(model, "config", None)
    if config is None and hasattr(model, "model"):  # a thrifty Backbone wraps the upstream model
        config = getattr(model.model, "config", None)
    sites = []
    for name, m in model.named_modules():
        if all(_is_linear(getattr(m, p, None)) for p in LLAMA_PROJ):
            sites.append(_llama_site(name, m, config))
        elif (
            _is_linear(getattr(getattr(m, "self", None), "query", None))
            and _is_linear(getattr(getattr(m, "self", None), "key", None))
            and _is_linear(getattr(getattr(m, "self", None), "value", None))
            and _is_linear(getattr(getattr(m, "output", None), "dense", None))
        ):
            sites.append(_bert_site(name, m, config))
    if not sites:
        raise ConfigError(
            f"no self-attention layer found in {type(model).__name__}: kv_heads needs Llama-style "
            "q_proj/k_proj/v_proj/o_proj (Llama, Qwen2, Mistral) or BERT-style attention.self.query/key/value "
            "+ attention.output.dense modules"
        )
    return sites


def check_kv_heads(sites: list[AttentionSite], kv_heads: int) -> None:
    """`kv_heads` must be fewer than the current KV heads of every layer and divide them."""
    for s in sites:
        if kv_heads >= s.num_kv_heads:
            raise ConfigError(
                f"kv_heads={kv_heads} does not compress {s.name!r}, which has {s.num_kv_heads} KV heads; "
                f"pass a value below {s.num_kv_heads}"
            )
        if s.num_kv_heads % kv_heads:
            divisors = [k for k in range(1, s.num_kv_heads) if s.num_kv_heads % k == 0]
            raise ConfigError(
                f"kv_heads={kv_heads} does not divide the {s.num_kv_heads} KV heads of {s.name!r} into equal "
                f"groups; use one of {divisors}"
            )


def unwrap(model: nn.Module) -> tuple[nn.Module, Any]:
    """(the transformers model, the thrifty backbone's tokenizer or None) of a transformers model, a thrifty Backbone
    or a TunedModel wrapping one (e.g. the causal LM `thrifty compress` builds)."""
    from thrifty.backbones.base import Backbone

    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, Backbone):
        model = backbone
    if isinstance(model, Backbone):
        return model.model, getattr(model.preprocess, "tokenizer", None)
    return model, None
