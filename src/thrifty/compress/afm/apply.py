"""The `afm` pipeline on one model (a TunedModel, a Backbone, or any module with `target_modules`):

    prepare   forward hooks stream float64 statistics of every target's output (and of each CTR field's rows)
    (batches) the proxy set runs through the model (calibration protocol; padding tokens are left out)
    convert   all-reduce the sums (torchrun) -> eigh / SVD -> ranks (thrifty.compress.afm.ranks) -> each target
              replaced by its LowRankLinear / FactorizedEmbedding -> the projections merged into the MLP's first
              layer where the backbone allows -> (init="scratch": every weight re-drawn) -> optional fine-tune
    prepare_for_loading   the converted structure (ranks recorded by convert), weights to be loaded

After convert, `model.thrifty_compress` = {config, structure, summary} (what `save` writes).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from thrifty.backbones import Backbone
from thrifty.backbones.ctr import CTRBackbone, FactorizedEmbedding
from thrifty.compress.afm.config import AFMConfig
from thrifty.compress.afm.factor import (
    LowRankLinear,
    afm_linear,
    afm_table,
    merge_tables,
    svd_factors,
    svd_linear,
    svd_table,
)
from thrifty.compress.afm.finetune import finetune_, reinit_
from thrifty.compress.afm.ranks import (
    Merge,
    Target,
    budget_params,
    energy_ranks,
    fixed_ranks,
    global_energy_ranks,
    sensitivity_ranks,
    total_params,
)
from thrifty.compress.afm.sensitivity import make_scorer
from thrifty.compress.afm.stats import FeatureStats, eig_desc
from thrifty.compress.calibration import check_step, run_calibration
from thrifty.errors import ConfigError
from thrifty.tuners.targeting import find_targets, set_submodule


STATE = "_afm_state"


@dataclass
class Sites:
    """Where the compressor acts: `linears` full name -> nn.Linear; `tables` full name -> field table;
    `reader`: full name of the Linear reading the flattened tables (None: no merge)."""

    backbone: Backbone | None
    linears: dict[str, nn.Linear]
    tables: dict[str, nn.Embedding]
    reader: str | None


def backbone_of(root: nn.Module) -> tuple[Backbone | None, str]:
    """The thrifty backbone inside `root` and the full-name prefix of its upstream model."""
    if isinstance(root, Backbone):
        return root, "model."
    bb = getattr(root, "backbone", None)
    return (bb, "backbone.model.") if isinstance(bb, Backbone) else (None, "")


def find_sites(root: nn.Module, config: AFMConfig, filter_fn=None) -> Sites:
    bb, prefix = backbone_of(root)
    rules = config.target_modules
    if rules is None:
        if bb is None:
            raise ConfigError("this model has no thrifty backbone to take default targets from; pass target_modules")
        rules = bb.low_rank_targets()
    upstream = bb.model if bb is not None else root
    names = find_targets(upstream, rules) if rules else []
    linears = {prefix + n: upstream.get_submodule(n) for n in names}
    if filter_fn is not None:
        linears = {k: m for k, m in linears.items() if filter_fn(m, k)}
    tables, reader = {}, None
    if config.embeddings and isinstance(bb, CTRBackbone) and not bb.deep_reads_codes:
        tables = {
            f"{prefix}embeddings.{f}": bb.model.embeddings[f]
            for f in bb.fields
            if type(bb.model.embeddings[f]) is nn.Embedding
        }
        reader = prefix + bb.deep_input_layer() if config.merge else None
    if not linears and not tables:
        raise ConfigError("nothing to compress: no targeted Linear layer and no embedding table")
    return Sites(bb, linears, tables, reader)


class Collector:
    """Forward hooks feeding FeatureStats; the root's pre-hook remembers the batch's attention mask so that
    padding tokens of (B, L, D) outputs stay out of the statistics."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None
        self.stats: dict[str, FeatureStats] = {}

    def root_hook(self, module: nn.Module, args: tuple) -> None:
        x = args[0] if args else None
        self.mask = x.get("attention_mask") if isinstance(x, dict) else None

    def hook(self, name: str, dim: int):
        def fn(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            y = output
            if y.dim() == 3 and self.mask is not None and tuple(self.mask.shape) == tuple(y.shape[:2]):
                y = y[self.mask.bool()]
            if name not in self.stats:
                self.stats[name] = FeatureStats(dim, y.device)
            self.stats[name].update(y)

        return fn


def prepare_(root: nn.Module, config: AFMConfig, filter_fn=None) -> None:
    """Find the targets and attach the statistics hooks (and keep the original model if `finetune='mimic'`)."""
    if hasattr(root, STATE):
        raise ConfigError("this model is already prepared for afm; convert it (step='convert') first")
    sites = find_sites(root, config, filter_fn)
    teacher = copy.deepcopy(root).eval() if config.finetune == "mimic" else None
    col = Collector()
    handles = [root.register_forward_pre_hook(col.root_hook)]
    for name, m in sites.linears.items():
        handles.append(m.register_forward_hook(col.hook(name, m.out_features)))
    for name, m in sites.tables.items():
        handles.append(m.register_forward_hook(col.hook(name, m.embedding_dim)))
    frozen = not any(p.requires_grad for p in root.parameters())
    object.__setattr__(
        root, STATE, {"sites": sites, "collector": col, "handles": handles, "teacher": teacher, "frozen": frozen}
    )


def _targets(sites: Sites, stats: dict[str, FeatureStats], config: AFMConfig) -> list[Target]:
    out = []
    bb = sites.backbone
    # a table keeps its projection unless the MLP alone reads it (through the merged layer)
    keep_projection = not (isinstance(bb, CTRBackbone) and not bb.needs_full_embeddings and sites.reader)
    for kind, group in (("linear", sites.linears), ("table", sites.tables)):
        for name, m in group.items():
            weight = m.weight
            rows, dim = (m.in_features, m.out_features) if kind == "linear" else (m.num_embeddings, m.embedding_dim)
            if config.init == "svd_w":
                factors = svd_factors(weight)
                spectrum, extra = factors[1] ** 2, {"factors": factors}
                max_rank = min(rows, dim)
            else:
                if name not in stats:
                    raise ConfigError(f"the proxy set never reached {name}; pass batches that run through it")
                st = stats[name]
                values, vectors = eig_desc(st.cov())
                spectrum, extra = values, {"mean": st.mean(), "vectors": vectors, "samples": st.n}
                max_rank = dim
            bias = kind == "table" or m.bias is not None
            out.append(Target(name, kind, rows, dim, max_rank, spectrum, keep_projection, bias, extra))
    return out


def _factorize(t: Target, module: nn.Module, rank: int, config: AFMConfig) -> nn.Module:
    svd = config.init == "svd_w"
    if t.kind == "linear":
        if svd:
            return svd_linear(module, t.extra["factors"], rank, config.act)
        return afm_linear(module, t.extra["mean"], t.extra["vectors"], rank, config.act)
    if svd:
        return svd_table(module, t.extra["factors"], rank)
    return afm_table(module, t.extra["mean"], t.extra["vectors"], rank)


def convert_(
    root: nn.Module, config: AFMConfig, batches: list[Any] | None = None, sensitivity: dict | None = None
) -> None:
    """Factorize the prepared model (see module docstring); `batches` are needed for sensitivity and fine-tuning.
    `sensitivity`: scores {target: {rank: D}} of an earlier run on the same model and proxy set (its summary's
    `layers[...]["sensitivity"]`), reused instead of measured (a budget sweep scores once)."""
    state = getattr(root, STATE, None)
    if state is None:
        raise ConfigError("convert needs a prepared model: compress_ with step='prepare' and run the proxy set first")
    for h in state["handles"]:
        h.remove()
    object.__delattr__(root, STATE)
    sites: Sites = state["sites"]
    stats = {k: s.all_reduce_() for k, s in state["collector"].stats.items()}
    targets = _targets(sites, stats, config)
    before = sum(p.numel() for p in root.parameters())
    fixed = before - sum(t.params(None) for t in targets)
    merge = None
    if sites.reader is not None and sites.tables:
        reader = root.get_submodule(sites.reader)
        first = sites.reader if sites.reader in sites.linears else None
        merge = Merge(reader.out_features, sites.backbone.arch.embed, list(sites.tables), first)
    scores = None
    if config.rank is not None:
        ranks = fixed_ranks(targets, config.rank, config.embed_rank)
    elif config.energy is not None:
        ranks = energy_ranks(targets, config.energy)
    else:
        goal = budget_params(targets, fixed, config.budget, config.size_ratio)
        if config.allocation == "energy":
            ranks = global_energy_ranks(targets, fixed, merge, goal)
        else:
            ranks, scores = sensitivity_ranks(targets, fixed, merge, goal, _scorer(root, config, batches, sensitivity))
    structure = rewrite_(root, sites, targets, ranks, config)
    if config.init == "scratch":
        reinit_(root)
    if config.finetune != "none":
        if batches is None:
            raise ConfigError(f"finetune={config.finetune!r} trains on the proxy set: use the one-call form")
        finetune_(root, config, batches, state["teacher"])
    for p in root.parameters():
        p.requires_grad_(not state["frozen"])
    root.eval()
    after = sum(p.numel() for p in root.parameters())
    summary = {
        "params_before": before,
        "params_after": after,
        "size_ratio": before / after,
        "target_params_before": sum(t.params(None) for t in targets),
        "target_params_after": total_params(ranks, targets, 0, merge),
        "layers": {
            t.name: {
                "kind": t.kind,
                "rank": ranks.get(t.name),
                "max_rank": t.max_rank,
                "energy_kept": float(t.spectrum[: ranks[t.name]].sum() / t.spectrum.sum().clamp_min(1e-300))
                if ranks.get(t.name)
                else 1.0,
                **({"samples": t.extra["samples"]} if "samples" in t.extra else {}),
                **({"sensitivity": scores[t.name]} if scores else {}),
            }
            for t in targets
        },
    }
    object.__setattr__(
        root, "thrifty_compress", {"config": config.to_dict(), "structure": structure, "summary": summary}
    )


def _scorer(root: nn.Module, config: AFMConfig, batches: list[Any] | None, given: dict | None):
    """score(target, rank): a reused score where `given` has it, else measured on the proxy set (the reference
    outputs are computed on the first measurement only)."""
    measure: list = []

    def score(t: Target, k: int) -> float:
        old = (given or {}).get(t.name, {})
        if k in old or str(k) in old:
            return float(old.get(k, old.get(str(k))))
        if batches is None:
            raise ConfigError("allocation='sensitivity' scores layers on the proxy set: use the one-call form")
        if not measure:
            build = lambda t, k: _factorize(t, root.get_submodule(t.name), k, config)  # noqa: E731
            measure.append(make_scorer(root, batches, config.sensitivity_samples, build))
        return measure[0](t, k)

    return score


def rewrite_(root: nn.Module, sites: Sites, targets: list[Target], ranks: dict, config: AFMConfig) -> dict:
    """Swap every target with a rank for its factorization; merge the tables into the reader; returns the
    structure `prepare_for_loading_` rebuilds."""
    structure: dict[str, Any] = {"linear": {}, "tables": {}, "merged": None}
    for t in targets:
        k = ranks.get(t.name)
        if k is None:
            continue
        new = _factorize(t, root.get_submodule(t.name), k, config)
        set_submodule(root, t.name, new)
        if t.kind == "linear":
            structure["linear"][t.name] = {"in": t.rows, "rank": k, "out": t.dim, "act": config.act}
        else:
            structure["tables"][t.name] = {"rows": t.rows, "rank": k, "dim": t.dim, "projection": True}
    bb = sites.backbone
    if sites.reader is not None and structure["tables"]:
        name = sites.reader + (".first" if isinstance(root.get_submodule(sites.reader), LowRankLinear) else "")
        tables = [bb.model.embeddings[f] for f in bb.fields]
        merged = merge_tables(root.get_submodule(name), tables, bb.arch.embed)
        set_submodule(root, name, merged)
        bb.deep_reads_codes = True
        structure["merged"] = {"name": name, "in": merged.in_features, "out": merged.out_features}
        if not bb.needs_full_embeddings:
            for tname, spec in structure["tables"].items():
                root.get_submodule(tname).proj = None
                spec["projection"] = False
    return structure


def prepare_for_loading_(root: nn.Module, structure: dict[str, Any], config: AFMConfig) -> None:
    """Rebuild the converted structure (weights uninitialised-equivalent, to be loaded)."""
    try:
        for name, s in structure["linear"].items():
            set_submodule(root, name, LowRankLinear(int(s["in"]), int(s["rank"]), int(s["out"]), bool(s["act"])))
        for name, s in structure["tables"].items():
            table = FactorizedEmbedding(int(s["rows"]), int(s["rank"]), int(s["dim"]), bool(s["projection"]))
            set_submodule(root, name, table)
        merged = structure.get("merged")
        if merged:
            set_submodule(root, merged["name"], nn.Linear(int(merged["in"]), int(merged["out"])))
            bb, _ = backbone_of(root)
            bb.deep_reads_codes = True
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"the saved afm structure does not fit this model ({exc})") from exc


def apply_afm_(
    model: nn.Module,
    config: AFMConfig,
    calib: Iterable[Any] | None = None,
    *,
    filter_fn=None,
    spec=None,
    sensitivity: dict | None = None,
) -> None:
    """The registry's `apply`: with `calib`, prepare -> statistics over it -> convert (-> fine-tune) in one call;
    without, the step of `config.step` alone. `sensitivity`: reuse scores (see convert_)."""
    step = check_step(config.step)
    if calib is not None:
        if step != "prepare":
            raise ConfigError(
                f"calibration batches run prepare -> batches -> convert; pass step='prepare', not {step}"
            )
        batches = calib if isinstance(calib, list) else list(calib)  # read more than once (sensitivity, fine-tune)
        prepare_(model, config, filter_fn)
        try:
            run_calibration(model, batches, config.calib_samples)
        except BaseException:
            for h in getattr(model, STATE)["handles"]:
                h.remove()
            object.__delattr__(model, STATE)
            raise
        convert_(model, config, batches, sensitivity)
    elif step == "prepare":
        prepare_(model, config, filter_fn)
    elif step == "convert":
        convert_(model, config, None, sensitivity)
    elif spec is None:
        raise ConfigError("step='prepare_for_loading' needs the saved structure (thrifty.compress.load_compressed)")
    else:
        prepare_for_loading_(model, spec, config)
