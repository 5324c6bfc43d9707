"""QwT-v2, channel-wise affine compensation (CWAC; Tang, Fu, Yu, Wu 2025; compression.md §2).

The paper's placement is not public (NOT FOUND). Our reading, documented in docs/methods.md: every quantized
Linear / Conv2d output channel c gets y_c <- a_c * y_q,c + beta_c, with

    a_c = Cov(y_q,c, y_fp,c) / (Var(y_q,c) + eps),   beta_c = E[y_fp,c] - a_c E[y_q,c]

where y_q = the quantized layer on its input in the quantized, already compensated pipeline, and y_fp = the float
model's activation of that layer on the same sample (`target="model"`, default) or the same layer in float on the
same quantized input (`target="layer"`, QwT's "same input" rule per layer). Layers are fitted one after another in
execution order: embed, block 0 .. L-1, tail (head); each fit sees the compensation of every layer before it.
`fold_cwac_` then moves a into the per-channel weight scale and beta into the bias, so the converted model has
exactly the parameters and operations of the plain PTQ model.

Options (issue 21 ablations): `skip_modules` leaves the matched layers without an affine; `fit` picks the estimator
(least squares, the paper's; "moments": mean and variance matching; "bias": mean shift only). `layernorm=True` also
fits the same per-channel affine on every LayerNorm output (y_q = the LayerNorm output in the quantized pipeline,
y_fp = the float model's), fitted in execution order with the quantized layers and folded into the LayerNorm's
weight and bias (gamma <- a gamma, b <- a b + beta) once every fit is done, so the float passes of the fit see the
original LayerNorm and the converted model keeps PTQ's parameters.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from thrifty.compress.progress import progress_bar, stage
from thrifty.compress.quant.config import QwTV2Config
from thrifty.compress.quant.layers import QuantModule, _QuantWeightLayer, quant_state
from thrifty.compress.quant.lstsq import ChannelAffine
from thrifty.compress.quant.pipeline import Pipeline, rows, to_device
from thrifty.compress.quant.ptq import pack_, prepare_ptq_for_loading_, quant_state_of
from thrifty.compress.quant.qwt import convert_compensated_, prepare_compensated_


class _Stop(Exception):
    """Raised inside a hook once the fitted layer's input has been seen: the rest of the segment is skipped."""


def _segments(pipe: Pipeline) -> list[tuple[str, Callable[[Any], Any]]]:
    """(name, fn(state) -> next state): embed maps inputs to (h, ctx); blocks map (h, ctx); tail gives logits."""
    segs: list[tuple[str, Callable[[Any], Any]]] = [("embed", pipe.embed)]
    for i in range(pipe.num_blocks):
        segs.append((f"block{i}", lambda s, i=i: (pipe.block(i, s[0], s[1]), s[1])))
    segs.append(("tail", lambda s: pipe.tail(s[0], s[1])))
    return segs


def _mask(pipe: Pipeline, state: Any) -> torch.Tensor | None:
    if isinstance(state, tuple) and isinstance(state[0], torch.Tensor):
        return pipe.token_mask(state[0], state[1])
    return None


NORM_AFFINE_ATTR = "thrifty_cwac_affine"


class _NormAffine(QuantModule):
    """A per-channel affine on a LayerNorm's output while CWAC is fitted; off in float runs (`quant_enabled`)."""

    def __init__(self, norm: nn.LayerNorm):
        super().__init__()
        c = norm.normalized_shape[-1]
        self.register_buffer("a", torch.ones(c))
        self.register_buffer("beta", torch.zeros(c))
        self.quant_enabled = True
        self.handle = norm.register_forward_hook(self._hook)
        norm.add_module(NORM_AFFINE_ATTR, self)  # a submodule, so quant_state(model, False) switches it off

    def _hook(self, module, args, out):
        return out * self.a + self.beta if self.quant_enabled else out

    def fold_into_(self, norm: nn.LayerNorm) -> None:
        """gamma <- a gamma, bias <- a bias + beta (exact: LayerNorm's output is gamma * xhat + bias)."""
        self.handle.remove()
        delattr(norm, NORM_AFFINE_ATTR)
        with torch.no_grad():
            if norm.weight is None:
                norm.weight = nn.Parameter(torch.ones_like(self.a), requires_grad=False)
            if norm.bias is None:
                norm.bias = nn.Parameter(torch.zeros_like(self.a), requires_grad=False)
            norm.bias.copy_(norm.bias * self.a + self.beta)
            norm.weight.mul_(self.a)


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    """PEFT-style module selection: exact name, `.`-separated suffix, or a regex that matches the whole name."""
    return any(name == p or name.endswith("." + p) or re.fullmatch(p, name) for p in patterns)


def _execution_order(fn: Callable[[Any], Any], state: Any, root: nn.Module, norms: bool = False) -> list[nn.Module]:
    seen: list[nn.Module] = []

    def hook(module, args):
        if module not in seen:
            seen.append(module)

    kinds = (_QuantWeightLayer, nn.LayerNorm) if norms else (_QuantWeightLayer,)
    handles = [m.register_forward_pre_hook(hook) for m in root.modules() if isinstance(m, kinds)]
    try:
        fn(state)
    finally:
        for h in handles:
            h.remove()
    return seen


def layer_outputs(layer: _QuantWeightLayer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(y_q, y_fp) of a converted, unpacked layer on the same input, before CWAC and output quantization."""
    y_q = layer._op(layer.input_quantizer(x), layer.weight_dequantized(), layer.bias)
    y_fp = layer._op(x, layer.weight, layer.bias)
    return y_q, y_fp


@torch.no_grad()
def fit_cwac_(model: nn.Module, config: QwTV2Config, batches: list[Any]) -> list[dict[str, Any]]:
    """Fit a, beta for every quantized layer in execution order; returns the per-layer log.

    `config.target`: "layer" fits y_q to the float layer on the same (quantized-prefix) input; "model" fits it to
    the float model's own activation of that layer (float prefix), so CWAC also absorbs the error accumulated
    upstream."""
    pipe = Pipeline(model)
    device = next(model.parameters()).device
    batches = [to_device(x, device) for x in batches]
    names = {id(m): n for n, m in model.named_modules()}
    segs = _segments(pipe)
    use_model = config.target == "model"
    cache: list[Any] | None = list(batches) if config.cache_hidden else None
    fp_cache: list[Any] | None = list(batches) if config.cache_hidden and use_model else None
    log = []
    norm_affines: dict[nn.Module, _NormAffine] = {}

    def states(k: int, fp: bool = False) -> Iterator[Any]:
        stored = fp_cache if fp else cache
        if stored is not None:
            yield from stored
            return
        for x in batches:
            s = x
            with quant_state(model, False) if fp else contextlib.nullcontext():
                for j in range(k):
                    s = segs[j][1](s)
            yield s

    def capture(layer: nn.Module, fn: Callable[[Any], Any], s: Any, fp: bool) -> Any:
        """The layer's output in one segment run: float model (fp) or (y_q, y_fp same input); a LayerNorm gives
        its output in the run (its affine on in the quantized run, off in the float one)."""
        out: list[Any] = []

        def hook(module, args):
            x = args[0]
            out.append(module._op(x, module.weight, module.bias) if fp else layer_outputs(module, x))
            raise _Stop

        def norm_hook(module, args, y):
            out.append(y if fp else (y, y))
            raise _Stop

        if isinstance(layer, nn.LayerNorm):  # registered after the _NormAffine hook: sees the affine's output
            handle = layer.register_forward_hook(norm_hook)
        else:
            handle = layer.register_forward_pre_hook(hook)
        try:
            with quant_state(model, False) if fp else contextlib.nullcontext(), contextlib.suppress(_Stop):
                fn(s)
        finally:
            handle.remove()
        return out[0]

    def fit_segment(k: int, fn: Callable[[Any], Any], seg_name: str, bar) -> list[dict[str, Any]]:
        """Fit a, beta of every quantized layer of segment k in execution order; returns their log entries."""
        log = []
        first = next(iter(states(k)))
        for layer in _execution_order(fn, first, model, norms=config.layernorm):
            if _matches(names[id(layer)], config.skip_modules):
                continue
            bar.set_postfix(layer=".".join(names[id(layer)].split(".")[-3:]), refresh=False)
            stats: ChannelAffine | None = None
            fp_states = states(k, fp=True) if use_model else None
            for s in states(k):
                mask = _mask(pipe, s)
                y_q, y_fp = capture(layer, fn, s, fp=False)
                if fp_states is not None:
                    y_fp = capture(layer, fn, next(fp_states), fp=True)
                yq_rows, yf_rows = rows(y_q, mask), rows(y_fp, mask)
                if stats is None:
                    stats = ChannelAffine(yq_rows.shape[1], device)
                stats.update(yq_rows, yf_rows)
                bar.update(1)
            a, beta = stats.solve(config.eps, config.fit)
            before, after = stats.sse(torch.ones_like(a), torch.zeros_like(beta)), stats.sse(a, beta)
            if isinstance(layer, nn.LayerNorm):
                norm_affines[layer] = _NormAffine(layer)
                norm_affines[layer].a.copy_(a.float())
                norm_affines[layer].beta.copy_(beta.float())
            else:
                layer.set_cwac_(a.float(), beta.float())
            log.append(
                {
                    "layer": names[id(layer)],
                    "segment": seg_name,
                    "channels": a.numel(),
                    "sse_before": before,
                    "sse_after": after,
                    "error_reduction": 1.0 - after / before if before > 0 else 0.0,
                    "a_mean": float(a.mean()),
                }
            )
        return log

    kinds = (_QuantWeightLayer, nn.LayerNorm) if config.layernorm else (_QuantWeightLayer,)
    total = sum(isinstance(m, kinds) and not _matches(n, config.skip_modules) for n, m in model.named_modules())
    title = f"QwT-v2 CWAC ({total} layers, {len(batches)} batches, target {config.target})"
    bar = progress_bar(total=total * len(batches), desc="QwT-v2 layer x batch", unit="batch")
    with stage(title) as info, bar:
        for k, (seg_name, fn) in enumerate(segs):
            log += fit_segment(k, fn, seg_name, bar)
            if k < len(segs) - 1:
                if cache is not None:
                    cache = [fn(s) for s in cache]
                if fp_cache is not None:
                    with quant_state(model, False):
                        fp_cache = [fn(s) for s in fp_cache]
        for norm, affine in norm_affines.items():
            affine.fold_into_(norm)
        if log:
            info["note"] = f"mean error reduction {sum(e['error_reduction'] for e in log) / len(log):.1%}"
    return log


def fold_cwac_(model: nn.Module) -> int:
    """Fold every attached CWAC into its layer's weight scale and bias; returns how many layers were folded."""
    n = 0
    for m in model.modules():
        if isinstance(m, _QuantWeightLayer) and m.cwac_a is not None:
            m.fold_cwac_()
            n += 1
    return n


# --- calibration protocol handlers ----------------------------------------------------------------------------------
prepare_qwt_v2_ = prepare_compensated_


def convert_qwt_v2_(model: nn.Module, config: QwTV2Config) -> dict[str, Any]:
    return convert_compensated_(model, config, compensate_qwt_v2_)


def compensate_qwt_v2_(model: nn.Module, config: QwTV2Config, batches: list[Any]) -> dict[str, Any]:
    """CWAC on a model already converted by the base PTQ with pack=False (then packs and folds per config)."""
    spec = quant_state_of(model)["spec"]
    log = fit_cwac_(model, config, batches)
    if config.base_config.pack:
        pack_(model)
    if config.fold:
        fold_cwac_(model)
    spec["cwac"] = {} if config.fold else {e["layer"]: e["channels"] for e in log}
    spec["compensation_log"] = log
    quant_state_of(model).update(spec=spec, config=config.to_dict())
    return spec


def prepare_qwt_v2_for_loading_(model: nn.Module, spec: dict[str, Any], config: QwTV2Config) -> None:
    prepare_ptq_for_loading_(model, spec, config.base_config)
    for name, channels in spec.get("cwac", {}).items():  # unfolded CWAC: allocate a, beta for the state dict
        layer = model.get_submodule(name)
        layer.set_cwac_(torch.ones(channels), torch.zeros(channels))
    quant_state_of(model).update(config=config.to_dict())
