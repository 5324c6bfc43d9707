"""Base PTQ: prepare (swap Linear/Conv2d for observing quantized layers) -> calibration batches -> convert.

convert: fold BatchNorm into the conv that feeds it (pairs seen during calibration), quantize weights per output
channel (or, with `weight_block_size`, per block of a <= 4-bit Linear row), set every activation range by the
percentile / L_p search, keep the first and last layers at `edge_bits`, and (with `pack`) drop the float weights.
The converted structure is summarised in a JSON-able `spec`, from which `prepare_for_loading` rebuilds the same
modules before a state dict is loaded.

Calibration state lives on the model (`model.thrifty_quant`, a plain dict) and in module attributes; hooks are
module-level functions, so a prepared model can be deep-copied and converted more than once (e.g. at several
bit widths from one calibration pass).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from thrifty.compress.progress import progress_bar, stage
from thrifty.compress.quant.attention import attach_softmax_quant, qkv_output_targets
from thrifty.compress.quant.config import PTQConfig
from thrifty.compress.quant.embedding import QuantEmbedding
from thrifty.compress.quant.layers import (
    QuantConv2d,
    QuantLinear,
    SoftmaxQuant,
    _QuantWeightLayer,
    supported_conv,
)
from thrifty.errors import ConfigError, NoMatchingModuleError
from thrifty.tuners.targeting import set_submodule


STATE = "thrifty_quant"
FilterFn = Callable[[nn.Module, str], bool]


def default_filter(module: nn.Module, fqn: str) -> bool:
    """Every nn.Linear and every supported nn.Conv2d (torchao's `filter_fn(module, fqn)` signature)."""
    return isinstance(module, nn.Linear) or supported_conv(module)


def quant_state_of(model: nn.Module) -> dict[str, Any] | None:
    return getattr(model, STATE, None)


def _set_state(model: nn.Module, state: dict[str, Any]) -> None:
    object.__setattr__(model, STATE, state)


# --- observation helpers (module-level functions: deep-copy safe) ------------------------------------------------
def _first_seen_hook(module: nn.Module, args: tuple) -> None:
    if getattr(module, "_thrifty_first_seen", None) is None:
        module._thrifty_first_seen = time.perf_counter_ns()


def _tag_output_hook(module: nn.Module, args: tuple, output: Any) -> None:
    if isinstance(output, torch.Tensor):
        output._thrifty_producer = module._thrifty_name


def _bn_input_hook(module: nn.Module, args: tuple) -> None:
    producer = getattr(args[0], "_thrifty_producer", None) if args else None
    seen = getattr(module, "_thrifty_fed_by", "?")
    module._thrifty_fed_by = producer if seen in ("?", producer) else None  # fed by several: never fold


def _remove_hooks(model: nn.Module) -> None:
    ours = (_first_seen_hook, _tag_output_hook, _bn_input_hook)
    for m in model.modules():
        for hooks in (m._forward_pre_hooks, m._forward_hooks):
            for key in [k for k, fn in hooks.items() if fn in ours]:
                del hooks[key]


# --- prepare -------------------------------------------------------------------------------------------------------
def prepare_ptq_(model: nn.Module, config: PTQConfig, filter_fn: FilterFn | None = None) -> list[str]:
    """Swap targeted layers for quantized ones in observe mode; returns the targeted names."""
    if quant_state_of(model) is not None:
        raise ConfigError("model is already prepared or quantized; quantize a fresh copy")
    filter_fn = filter_fn or default_filter
    targets = [
        name
        for name, m in model.named_modules()
        if name and (isinstance(m, nn.Linear) or supported_conv(m)) and filter_fn(m, name)
    ]
    if not targets:
        raise NoMatchingModuleError("no nn.Linear / nn.Conv2d matched `filter_fn`; nothing to quantize")
    qkv = qkv_output_targets(model) if config.qkv_quant else {}
    originals = {}
    for name in targets:
        orig = model.get_submodule(name)
        cls = QuantLinear if isinstance(orig, nn.Linear) else QuantConv2d
        q = cls(orig, out_segments=qkv.get(name, 0), observer_samples=config.observer_samples)
        q._thrifty_name = name
        q.input_quantizer.mode = "observe"
        if q.output_quantizer is not None:
            q.output_quantizer.mode = "observe"
        q.register_forward_pre_hook(_first_seen_hook)
        if isinstance(q, QuantConv2d) and config.fold_bn:
            q.register_forward_hook(_tag_output_hook)
        originals[name] = orig
        set_submodule(model, name, q)
    embeddings = _swap_embeddings_(model) if config.embedding_bits is not None else []
    log2 = config.softmax_quantizer == "log2"
    softmax = attach_softmax_quant(model, log2, config.observer_samples) if config.softmax_quant else []
    for name in softmax:
        model.get_submodule(name).quantizer.mode = "observe"
    if config.fold_bn:
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.register_forward_pre_hook(_bn_input_hook)
    if config.conv_output_quant:
        from thrifty.compress.quant.conv_qdq import prepare_conv_qdq_

        prepare_conv_qdq_(model, config.observer_samples)
    _set_state(model, {"status": "prepared", "originals": originals, "softmax": softmax, "embeddings": embeddings})
    return targets


def _swap_embeddings_(model: nn.Module) -> list[str]:
    """Every plain nn.Embedding -> QuantEmbedding (quantized at convert; tables need no calibration data)."""
    names = [
        n for n, m in model.named_modules() if n and type(m) is nn.Embedding and m.max_norm is None and not m.sparse
    ]
    for name in names:
        set_submodule(model, name, QuantEmbedding(model.get_submodule(name)))
    return names


# --- convert -------------------------------------------------------------------------------------------------------
def _fold_bn_(conv: QuantConv2d, bn: nn.BatchNorm2d) -> None:
    """W <- W * g / sqrt(var + eps), b <- (b - mean) * g / sqrt(var + eps) + beta (eval-mode BatchNorm)."""
    with torch.no_grad():
        inv = (
            bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1.0 / torch.sqrt(bn.running_var + bn.eps)
        )
        shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
        conv.weight.mul_(inv.view(-1, 1, 1, 1))
        conv.bias.copy_((conv.bias - bn.running_mean) * inv + shift)


def _block_module_ids(model: nn.Module) -> set[int]:
    from thrifty.backbones import Backbone

    bb = model if isinstance(model, Backbone) else getattr(model, "backbone", None)
    if not isinstance(bb, Backbone):
        return set()
    return {id(m) for blk in bb.blocks for m in blk.modules()}


def _edge_layers(model: nn.Module, order: list[str]) -> list[str]:
    """First layer (if it runs before the blocks, e.g. patch embedding / stem) and last layer (classifier)."""
    if not order:
        return []
    inside = _block_module_ids(model)
    edges = [order[-1]]
    if id(model.get_submodule(order[0])) not in inside:
        edges.insert(0, order[0])
    return edges


def convert_ptq_(model: nn.Module, config: PTQConfig, pack: bool | None = None) -> dict[str, Any]:
    """Compute quantization parameters from the observations; returns the converted `spec`."""
    state = quant_state_of(model)
    if state is None or state["status"] != "prepared":
        raise ConfigError("convert needs a prepared model: quantize_(model, config with step='prepare') first")
    _remove_hooks(model)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, _QuantWeightLayer)}
    reverted = [n for n, m in layers.items() if not m.input_quantizer.observed]
    for name in reverted:  # never executed during calibration (dead code): left in float
        set_submodule(model, name, state["originals"][name])
        del layers[name]
    if not layers:
        raise ConfigError("no quantized layer ran during calibration; run batches between prepare and convert")
    folded = {}
    for bn_name, bn in list(model.named_modules()):
        producer = getattr(bn, "_thrifty_fed_by", None)
        if isinstance(bn, nn.BatchNorm2d) and producer in layers and isinstance(layers[producer], QuantConv2d):
            _fold_bn_(layers[producer], bn)
            set_submodule(model, bn_name, nn.Identity())
            folded[bn_name] = producer
    for m in model.modules():
        if hasattr(m, "_thrifty_fed_by"):
            del m._thrifty_fed_by
    order = sorted(layers, key=lambda n: layers[n]._thrifty_first_seen)
    edges = _edge_layers(model, order) if config.edge_bits is not None else []
    with stage(f"PTQ ranges (w{config.w_bits}a{config.a_bits}, {len(layers)} layers)"):
        for name, layer in progress_bar(layers.items(), total=len(layers), desc="PTQ ranges", unit="layer"):
            w_bits = config.edge_bits if name in edges else config.w_bits
            a_bits = config.edge_bits if name in edges else config.a_bits
            layer.quantize_weight_(
                w_bits,
                config.weight_symmetric,
                config.percentiles,
                config.lp_norm,
                config.half_params,
                config.weight_block_size,
            )
            layer.input_quantizer.calibrate(a_bits, config.percentiles, config.lp_norm)
            layer.input_quantizer.drop_observations()
            if layer.output_quantizer is not None:
                layer.output_quantizer.calibrate(a_bits, config.percentiles, config.lp_norm)
                layer.output_quantizer.drop_observations()
    softmax = {}
    for name in state["softmax"]:
        sq: SoftmaxQuant = model.get_submodule(name)
        if sq.quantizer.observed:
            sq.quantizer.calibrate(config.a_bits, config.percentiles, config.lp_norm)
            softmax[name] = sq.spec()
        else:  # attention that never ran: stays float
            sq.quantizer.mode = "off"
        sq.quantizer.drop_observations()
    embeddings = {}
    for name in state.get("embeddings", []):
        emb: QuantEmbedding = model.get_submodule(name)
        emb.quantize_weight_(
            config.embedding_bits, config.percentiles, config.lp_norm, config.half_params, config.embedding_block_size
        )
        embeddings[name] = emb.spec()
    conv_qdq = None
    if config.conv_output_quant:
        from thrifty.compress.quant.conv_qdq import convert_conv_qdq_

        conv_qdq = convert_conv_qdq_(model, config)
    spec = {
        "layers": {n: layers[n].spec() for n in order},
        "embeddings": embeddings,
        "softmax": softmax,
        "folded_bn": folded,
        "reverted": reverted,
        "edges": edges,
    }
    if conv_qdq is not None:
        spec["conv_qdq"] = conv_qdq
    _set_state(model, {"status": "converted", "spec": spec, "config": config.to_dict()})
    if config.pack if pack is None else pack:
        if config.half_params:  # packed: no float path left whose bias this could change
            for layer in layers.values():
                if layer.bias is not None:
                    _half_bias_(layer)
        pack_(model)
    return spec


def _half_bias_(layer: nn.Module) -> None:
    """Round the bias to float16 values (stays float32; `PTQConfig.half_params`), unless one would overflow. Only
    when PTQ packs: an unpacked model keeps its exact float path (QwT / QwT-v2 pack later: exact biases)."""
    with torch.no_grad():
        if bool((layer.bias.abs() <= 65504).all()):
            layer.bias.copy_(layer.bias.half().float())


def pack_(model: nn.Module) -> None:
    """Drop the float weights of every quantized layer (codes, scales and biases remain)."""
    for m in model.modules():
        if (isinstance(m, _QuantWeightLayer) and not m.packed) or isinstance(m, QuantEmbedding):
            m.pack_()


# --- loading -------------------------------------------------------------------------------------------------------
def prepare_ptq_for_loading_(model: nn.Module, spec: dict[str, Any], config: PTQConfig) -> None:
    """Rebuild the converted, packed structure described by `spec` (values then come from a state dict)."""
    if quant_state_of(model) is not None:
        raise ConfigError("model is already prepared or quantized; load into a fresh model")
    for bn_name in spec["folded_bn"]:
        set_submodule(model, bn_name, nn.Identity())
    for name, s in spec["layers"].items():
        orig = model.get_submodule(name)
        cls = QuantLinear if s["kind"] == "linear" else QuantConv2d
        q = cls(orig, out_segments=s["out_segments"])
        q.empty_like_converted_(s)
        q.pack_()
        set_submodule(model, name, q)
    for name, s in spec.get("embeddings", {}).items():
        q = QuantEmbedding(model.get_submodule(name))
        q.empty_like_converted_(s)
        q.pack_()
        set_submodule(model, name, q)
    if spec["softmax"]:
        attach_softmax_quant(model, all(s.get("log2", True) for s in spec["softmax"].values()))
        for name, s in spec["softmax"].items():
            sq: SoftmaxQuant = model.get_submodule(name)
            sq.quantizer.loaded_(s["a_bits"])
    if spec.get("conv_qdq"):
        from thrifty.compress.quant.conv_qdq import restore_conv_qdq_

        restore_conv_qdq_(model, spec["conv_qdq"])
    _set_state(model, {"status": "converted", "spec": spec, "config": config.to_dict()})
