"""`compress_kv_heads_`: turn every attention layer's KV heads into `config.kv_heads` shared heads, in place.

    compress_kv_heads_(model, KVHeadsConfig(kv_heads=1), calib_batches)   # returns None
    save_compressed(model, "out/", tokenizer=tok)                          # a folder stock transformers loads

Steps (compression.md §4.2): stream key/value second moments over the calibration tokens (statistics.py), group the
heads (grouping.py), fit one merge per group and cache (fit.py), fold the merges into q/k/v/o (fold.py). The
per-layer groups and reconstruction errors are kept on the model (`kv_heads_report(model)`) for compression.json.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from thrifty.compress.kv_heads.config import KVHeadsConfig
from thrifty.compress.kv_heads.fit import Merge, fit, group_gram, weight_gram
from thrifty.compress.kv_heads.fold import fold_site_, query_order
from thrifty.compress.kv_heads.grouping import make_groups
from thrifty.compress.kv_heads.sites import AttentionSite, check_kv_heads, find_attention_sites, unwrap
from thrifty.compress.kv_heads.statistics import KVStatistics, collect_statistics
from thrifty.errors import ConfigError


REPORT_ATTR = "_thrifty_kv_heads_report"


def _hf_config(model: nn.Module) -> Any:
    return getattr(unwrap(model)[0], "config", None)


def _fit_cache(
    source: str,
    structure: str,
    layer_gram: torch.Tensor | None,
    linear: nn.Linear,
    group: list[int],
    head_dim: int,
) -> Merge:
    g = len(group)
    if source == "mean":
        return fit("mean", None, g, head_dim)
    if source == "svd_w":
        return fit(structure, weight_gram(linear.weight, linear.bias, group, head_dim), g, head_dim)
    return fit(structure, group_gram(layer_gram, group, head_dim), g, head_dim)


def plan_layer(
    site: AttentionSite, index: int, config: KVHeadsConfig, stats: KVStatistics | None
) -> tuple[list[list[int]], list[Merge], list[Merge], dict[str, Any]]:
    """(groups, key merges, value merges, report entry) of site `index`, from the statistics (None: no calibration)."""
    d, h = site.head_dim, site.num_kv_heads
    key_source, key_structure = config.key_strategy(site.rope)
    k_gram = v_gram = post_gram = None
    if stats is not None:
        k_gram, v_gram = stats.keys[index].matrix, stats.values[index].matrix
        post = stats.post_rope_keys[index]
        post_gram = post.matrix if post is not None else None
    groups = make_groups(config.grouping, h, config.kv_heads, d, [k_gram, v_gram] if stats is not None else None)
    # post_rope fits its unconstrained map on keys after RoPE (svd_a) and reports its error there
    k_fit_gram = post_gram if key_structure == "post_rope" and post_gram is not None else k_gram
    key_merges = [_fit_cache(key_source, key_structure, k_fit_gram, site.linear("k"), g, d) for g in groups]
    value_merges = [_fit_cache(config.values, "full", v_gram, site.linear("v"), g, d) for g in groups]
    entry: dict[str, Any] = {"name": site.name, "groups": groups, "kv_heads_before": h}
    if site.family == "llama":
        entry["query_order"] = query_order(site, groups)
    if stats is not None:
        entry["k_rel_err"] = _mean_error(key_merges, groups, k_fit_gram, d)
        entry["v_rel_err"] = _mean_error(value_merges, groups, v_gram, d)
        entry["k_err_space"] = "post_rope" if k_fit_gram is post_gram and post_gram is not None else "pre_rope"
    return groups, key_merges, value_merges, entry


def _mean_error(merges: list[Merge], groups: list[list[int]], gram: torch.Tensor, d: int) -> float:
    """Energy-weighted relative reconstruction error of the layer's cache over all groups."""
    num = den = 0.0
    for merge, group in zip(merges, groups):
        c = group_gram(gram, group, d)
        total = float(torch.trace(c))
        num += merge.relative_error(c) * total
        den += total
    return num / den if den > 0 else 0.0


@torch.no_grad()
def compress_kv_heads_(
    model: nn.Module,
    config: KVHeadsConfig,
    calib_batches: Iterable[Any] | None = None,
    *,
    forward: Callable[[Any], Any] | None = None,
    calib_description: str | None = None,
    statistics: tuple[KVStatistics, dict[str, Any]] | None = None,
    progress: bool = False,
) -> None:
    """Merge the KV heads of every self-attention layer of `model` into `config.kv_heads` heads, in place.

    `model`: a transformers Llama-style causal LM / decoder (GQA or MHA), a BERT-style encoder, or a thrifty
    Backbone wrapping one. `calib_batches`: dicts with `input_ids` + `attention_mask` (or id tensors); needed unless
    every strategy is `mean`/`svd_w` and grouping is consecutive. `forward(inputs)` overrides how a batch is run.
    `statistics`: a `collect_statistics(...)` result on this same model (same weights) instead of a calibration
    pass, to compare configs on one pass; it must hold post-RoPE keys when `rope_keys="post_rope"`.
    Errors: ConfigError when no attention is found or `kv_heads` does not divide (or is not below) the KV heads.
    """
    if not isinstance(config, KVHeadsConfig):
        raise ConfigError(f"compress_kv_heads_ needs a KVHeadsConfig, got {type(config).__name__}")
    sites = find_attention_sites(model)
    check_kv_heads(sites, config.kv_heads)
    has_rope = any(s.rope for s in sites)
    stats, calib = None, None
    source, structure = config.key_strategy(has_rope)
    if statistics is not None:
        stats, calib = statistics
        if len(stats.keys) != len(sites) or any(
            g.sum.shape[0] != s.num_kv_heads * s.head_dim for g, s in zip(stats.keys, sites)
        ):
            raise ConfigError("`statistics` were collected on a model with other attention layers; recollect them")
        if structure == "post_rope" and any(p is None for p, s in zip(stats.post_rope_keys, sites) if s.rope):
            raise ConfigError("rope_keys='post_rope' needs statistics collected with post_rope=True")
        calib = dict(calib)
    elif config.needs_calibration(has_rope):
        stats, calib = collect_statistics(
            model,
            sites,
            calib_batches,
            calib_samples=config.calib_samples,
            calib_tokens=config.calib_tokens,
            post_rope=structure == "post_rope",
            forward=forward,
            progress=progress,
        )
    if calib is not None and calib_description:
        calib["description"] = calib_description
    layers = []
    for i, site in enumerate(sites):
        groups, key_merges, value_merges, entry = plan_layer(site, i, config, stats)
        fold_site_(site, groups, key_merges, value_merges)
        layers.append(entry)
    hf_config = _hf_config(model)
    kv_before = layers[0]["kv_heads_before"]
    shapes_kept = any(s.family == "bert" for s in sites)
    if hf_config is not None and not shapes_kept and hasattr(hf_config, "num_key_value_heads"):
        hf_config.num_key_value_heads = config.kv_heads
    report = {
        "method": config.method,
        "config": config.to_dict(),
        "kv_heads_before": kv_before,
        "kv_heads_after": config.kv_heads,
        "key_fit": {"source": source, "structure": structure, "rope": has_rope},
        "shapes_kept": shapes_kept,
        "calibration": calib,
        "layers": layers,
    }
    if shapes_kept:
        report["note"] = (
            "BERT has no num_key_value_heads: the shared heads are repeated into every head slot, so the saved "
            "model has the original shapes (exact K-head algebra and accuracy, no memory saving)"
        )
    setattr(model, REPORT_ATTR, report)


def kv_heads_report(model: nn.Module) -> dict[str, Any] | None:
    """What `compress_kv_heads_` did to `model` (groups, per-layer errors, calibration), or None."""
    return getattr(model, REPORT_ATTR, None)
