"""Fold the merges into the attention weights (exact algebra, no extra matmul at inference).

Row-vector convention, one token, x (1, D); a Linear is y = x W^T + b. For a group G with merge (E, B_h):

* shared key/value head:  u = k_G E = x (E^T W_G)^T + b_G E   ->  new rows E^T W_G (d, D), bias E^T b_G
* keys, query head i reading old head h:  q_i k_h^T ~ q_i (u B_h^T)^T = (q_i B_h) u^T
                                           ->  q rows B_h^T W_q,i, bias B_h^T b_q,i
* values, query head i reading old head h: o_i W_o,i^T ~ (A_i u B_h^T) W_o,i^T = A_i u (W_o,i B_h)^T
                                           ->  o columns W_o,i B_h

With RoPE the key fold is exact when B_h commutes with the rotation (the `complex` and `mean` merges).

Llama-style: k_proj/v_proj shrink to K*d rows, `num_key_value_heads` = K in the config and
`num_key_value_groups` = H / K on every attention module; the query heads are reordered group by group (a no-op
for consecutive groups). BERT has no `num_key_value_heads`: its K shared heads are written into all H head slots
(head h gets its group's shared weights), so the model keeps its shapes and runs in stock transformers. That proves
the algebra and measures the accuracy of a K-head model, but saves no memory; a GQA kernel would store K heads.
"""

from __future__ import annotations

import torch
from torch import nn

from thrifty.compress.kv_heads.fit import Merge
from thrifty.compress.kv_heads.sites import AttentionSite


def _f64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().to(device="cpu", dtype=torch.float64)


def _rows(w: torch.Tensor, head: int, d: int) -> torch.Tensor:
    return w[head * d : (head + 1) * d]


def _shared(w: torch.Tensor, b: torch.Tensor | None, group: list[int], merge: Merge, d: int):
    """The shared head's (d, D) weight and (d,) bias: E^T W_G, E^T b_G."""
    wg = torch.cat([_rows(w, h, d) for h in group])
    bg = None if b is None else torch.cat([_rows(b, h, d) for h in group])
    return merge.project.T @ wg, None if bg is None else merge.project.T @ bg


def _new_linear(old: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    ref = old.weight
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight.to(ref.dtype))
        if bias is not None:
            lin.bias.copy_(bias.to(ref.dtype))
    lin.weight.requires_grad_(ref.requires_grad)
    if bias is not None:
        lin.bias.requires_grad_(old.bias.requires_grad)
    return lin


def query_order(site: AttentionSite, groups: list[list[int]]) -> list[int]:
    """Old query-head index of every new query-head slot (Llama: group by group, r query heads per old KV head)."""
    r = site.queries_per_kv
    return [h * r + j for group in groups for h in group for j in range(r)]


def fold_site_(
    site: AttentionSite, groups: list[list[int]], key_merges: list[Merge], value_merges: list[Merge]
) -> None:
    """Rewrite one attention layer in place (module docstring)."""
    d = site.head_dim
    q, k, v, o = (site.linear(w) for w in "qkvo")
    wq, bq, wk, bk = _f64(q.weight), _f64(q.bias), _f64(k.weight), _f64(k.bias)
    wv, bv, wo = _f64(v.weight), _f64(v.bias), _f64(o.weight)
    r = site.queries_per_kv
    # per old KV head h: its expansion maps
    bk_of, bv_of = {}, {}
    for group, km, vm in zip(groups, key_merges, value_merges):
        for pos, h in enumerate(group):
            bk_of[h], bv_of[h] = km.expand[pos], vm.expand[pos]
    shared_k = [_shared(wk, bk, g, m, d) for g, m in zip(groups, key_merges)]
    shared_v = [_shared(wv, bv, g, m, d) for g, m in zip(groups, value_merges)]

    if site.family == "llama":
        slots = query_order(site, groups)
        new_k = torch.cat([w for w, _ in shared_k])
        new_kb = None if bk is None else torch.cat([b for _, b in shared_k])
        new_v = torch.cat([w for w, _ in shared_v])
        new_vb = None if bv is None else torch.cat([b for _, b in shared_v])
    else:  # BERT: every head slot h keeps its place and gets its group's shared head
        slots = list(range(site.num_heads))
        head_group = {h: c for c, group in enumerate(groups) for h in group}
        new_k = torch.cat([shared_k[head_group[h]][0] for h in slots])
        new_kb = None if bk is None else torch.cat([shared_k[head_group[h]][1] for h in slots])
        new_v = torch.cat([shared_v[head_group[h]][0] for h in slots])
        new_vb = None if bv is None else torch.cat([shared_v[head_group[h]][1] for h in slots])

    new_q = torch.empty_like(wq)
    new_qb = None if bq is None else torch.empty_like(bq)
    new_o = torch.empty_like(wo)
    for slot, old in enumerate(slots):
        kv = old // r  # the old KV head this query head read
        sl, ol = slice(slot * d, (slot + 1) * d), slice(old * d, (old + 1) * d)
        new_q[sl] = bk_of[kv].T @ wq[ol]
        if bq is not None:
            new_qb[sl] = bk_of[kv].T @ bq[ol]
        new_o[:, sl] = wo[:, ol] @ bv_of[kv]

    qkv_parent, o_parent = site.qkv_parent, site.o_parent
    setattr(qkv_parent, site.attr("q"), _new_linear(q, new_q, new_qb))
    setattr(qkv_parent, site.attr("k"), _new_linear(k, new_k, new_kb))
    setattr(qkv_parent, site.attr("v"), _new_linear(v, new_v, new_vb))
    setattr(o_parent, site.attr("o"), _new_linear(o, new_o, _f64(o.bias)))
    if site.family == "llama":
        num_kv = len(groups)
        site.module.num_key_value_groups = site.num_heads // num_kv
        if hasattr(site.module, "num_key_value_heads"):
            site.module.num_key_value_heads = num_kv
        site.num_kv_heads = num_kv
