"""QwT, "Quantization without Tears" (Fu et al., CVPR 2025; compression.md §1): per block i, in order,

    out_i(X) = Block_i^Q(X) + X W_i + b_i,   [W_i; b_i] = lstsq([X, 1], Block_i^FP(X) - Block_i^Q(X))

X = the block's input in the already compensated, quantized pipeline; FP = the same block with its quantizers
off. Normal equations are streamed in float64 (lstsq.NormalEquations); R^2 <= 0 leaves the block without a
branch. CNN blocks get the released ResNet variant: a grouped conv (kernel `kernel_size`, stride 2 where the
block halves H and W, ridge 1e-3 by default). The branch is stored in float16, excluded from quantization, and
computed as an fp16 GEMM would be: fp16 inputs and weights, float32 accumulation, fp16 output, + bias.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from thrifty.compress.progress import progress_bar, stage
from thrifty.compress.quant.config import QwTConfig
from thrifty.compress.quant.layers import QuantModule, quant_state
from thrifty.compress.quant.lstsq import NormalEquations
from thrifty.compress.quant.pipeline import Pipeline, rows, start_recording, stop_recording, to_device
from thrifty.compress.quant.ptq import convert_ptq_, pack_, prepare_ptq_, prepare_ptq_for_loading_, quant_state_of


class LinearCompensation(nn.Module):
    """x (..., d_in) -> x W + b; W (d_in, d_out) and b (d_out,) stored in float16."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d_in, d_out, dtype=torch.float16), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(d_out, dtype=torch.float16), requires_grad=False)
        self.export_half = False  # True while exporting: a real fp16 MatMul in the graph

    def spec(self) -> dict[str, Any]:
        return {"kind": "linear", "d_in": self.weight.shape[0], "d_out": self.weight.shape[1]}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.export_half:
            return (x.half() @ self.weight).float() + self.bias.float()
        return (x.half().float() @ self.weight.float()).half().float() + self.bias.float()


class ConvCompensation(nn.Module):
    """Grouped conv branch: weight (C_out, C_in / G, k, k), bias (C_out,), float16; padding k // 2."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, stride: int, groups: int):
        super().__init__()
        k = kernel_size
        self.weight = nn.Parameter(torch.zeros(c_out, c_in // groups, k, k, dtype=torch.float16), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(c_out, dtype=torch.float16), requires_grad=False)
        self.stride, self.groups, self.kernel_size = int(stride), int(groups), int(k)
        self.export_half = False

    def spec(self) -> dict[str, Any]:
        c_out, cin_g = self.weight.shape[:2]
        return {
            "kind": "conv",
            "c_in": cin_g * self.groups,
            "c_out": c_out,
            "kernel_size": self.kernel_size,
            "stride": self.stride,
            "groups": self.groups,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad, b = self.kernel_size // 2, self.bias.float().view(1, -1, 1, 1)
        if self.export_half:
            return F.conv2d(x.half(), self.weight, None, self.stride, pad, 1, self.groups).float() + b
        y = F.conv2d(x.half().float(), self.weight.float(), None, self.stride, pad, 1, self.groups)
        return y.half().float() + b


def build_compensation(spec: dict[str, Any]) -> nn.Module:
    if spec["kind"] == "linear":
        return LinearCompensation(spec["d_in"], spec["d_out"])
    return ConvCompensation(spec["c_in"], spec["c_out"], spec["kernel_size"], spec["stride"], spec["groups"])


class QwTBlock(QuantModule):
    """`block(x, ...) + comp(x)`; with quantization switched off the branch is skipped (the float model)."""

    def __init__(self, block: nn.Module, comp: nn.Module):
        super().__init__()
        self.block, self.comp = block, comp
        self.quant_enabled = True

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = self.block(x, *args, **kwargs)
        if not self.quant_enabled:
            return out
        c = self.comp(x)
        if isinstance(out, tuple):
            return (out[0] + c, *out[1:])
        return out + c


def conv_groups(c_in: int, c_out: int, factor: int) -> int:
    """`max(C_in // factor, 1)` (released code), lowered until it divides both channel counts."""
    g = max(c_in // factor, 1)
    common = math.gcd(c_in, c_out)
    while common % g:
        g -= 1
    return g


def _conv_rows(x: torch.Tensor, groups: int, k: int, stride: int) -> torch.Tensor:
    """(B, C, H, W) -> (G, B * H' * W', C / G * k * k) patches of each group."""
    cols = F.unfold(x, k, padding=k // 2, stride=stride)  # (B, C*k*k, L)
    b, f, length = cols.shape
    return cols.transpose(1, 2).reshape(b * length, groups, f // groups).transpose(0, 1)


@torch.no_grad()
def fit_qwt_(model: nn.Module, config: QwTConfig, batches: list[Any]) -> list[dict[str, Any]]:
    """Fit and attach the compensation of every block in order; returns the per-block log (R^2, params)."""
    pipe = Pipeline(model)
    device = next(model.parameters()).device
    batches = [to_device(x, device) for x in batches]
    cache = [pipe.embed(x) for x in batches] if config.cache_hidden else None
    log = []
    with stage(f"QwT compensation ({pipe.num_blocks} blocks, {len(batches)} batches)") as info:
        with progress_bar(total=pipe.num_blocks * len(batches), desc="QwT block x batch", unit="batch") as bar:
            for i in range(pipe.num_blocks):
                entry = _fit_block_(pipe, i, config, batches, cache, device, bar)
                bar.set_postfix(block=i, r2=f"{entry['r2']:.3f}")
                log.append(entry)
                if cache is not None:
                    cache = [(pipe.block(i, h, ctx), ctx) for h, ctx in cache]
        info["note"] = f"{sum(e['compensated'] for e in log)} of {len(log)} blocks compensated"
    return log


def _fit_block_(
    pipe: Pipeline, i: int, config: QwTConfig, batches: list[Any], cache: list | None, device, bar
) -> dict[str, Any]:
    """Fit block i's compensation on its inputs; attach it if it passes the gates; returns the block's log entry."""
    block = pipe.backbone.blocks[i]
    acc, meta = None, {}
    for h, ctx in pipe.block_inputs(batches, i, cache):
        bar.update(1)
        with quant_state(block, False):
            y_fp = pipe.block(i, h, ctx)
        y_q = pipe.block(i, h, ctx)
        r = y_fp - y_q
        if h.dim() == 4:
            if acc is None:
                stride = max(1, round(h.shape[-1] / r.shape[-1]))
                groups = conv_groups(h.shape[1], r.shape[1], config.group_factor)
                meta = {"kind": "conv", "c_in": h.shape[1], "c_out": r.shape[1], "stride": stride}
                meta.update(kernel_size=config.kernel_size, groups=groups)
                f = h.shape[1] // groups * config.kernel_size**2
                acc = NormalEquations(f, r.shape[1] // groups, groups, device)
            X = _conv_rows(h, meta["groups"], meta["kernel_size"], meta["stride"])
            R = rows(r, None)
            if R.shape[0] != X.shape[1]:
                raise RuntimeError(f"block {i}: compensation patches ({X.shape[1]}) != outputs ({R.shape[0]})")
            acc.update(X, R.reshape(R.shape[0], meta["groups"], -1).transpose(0, 1))
        else:
            mask = pipe.token_mask(h, ctx)
            if acc is None:
                meta = {"kind": "linear", "d_in": h.shape[-1], "d_out": r.shape[-1]}
                acc = NormalEquations(h.shape[-1], r.shape[-1], 1, device)
            acc.update(rows(h, mask), rows(r, mask))
    ridge = config.ridge if config.ridge is not None else (1e-3 if meta["kind"] == "conv" else 0.0)
    theta = acc.solve(ridge)
    r2 = acc.r2(theta)
    comp = build_compensation(meta)
    _load_theta_(comp, theta)
    finite = all(torch.isfinite(p).all() for p in comp.parameters())
    keep = i >= config.start_block and finite and (r2 > 0 or not config.r2_gate)
    entry = {"block": i, "r2": r2, "rows": acc.n, "compensated": keep, "kind": meta["kind"], "ridge": ridge}
    if keep:
        pipe.backbone.blocks[i] = QwTBlock(block, comp.to(device))
        entry.update(comp=comp.spec(), params=sum(p.numel() for p in comp.parameters()))
    return entry


def _load_theta_(comp: nn.Module, theta: torch.Tensor) -> None:
    """Theta (G, f + 1, m) -> the branch's float16 weight and bias."""
    w, b = theta[:, :-1, :], theta[:, -1, :]
    with torch.no_grad():
        if isinstance(comp, LinearCompensation):
            comp.weight.copy_(w[0].to(torch.float16))
            comp.bias.copy_(b[0].to(torch.float16))
        else:
            g, _, m = w.shape
            k = comp.kernel_size
            weight = w.transpose(1, 2).reshape(g * m, -1, k, k)  # (C_out, C_in/G, k, k)
            comp.weight.copy_(weight.to(torch.float16))
            comp.bias.copy_(b.reshape(-1).to(torch.float16))


# --- calibration protocol handlers ----------------------------------------------------------------------------------
def prepare_compensated_(model: nn.Module, config, filter_fn=None) -> None:
    """`prepare` of every compensation method (QwT, QwT-v2): the base PTQ's prepare, then record block inputs."""
    Pipeline(model)  # fail before any change if the model cannot be walked block by block
    prepare_ptq_(model, config.base_config, filter_fn)
    start_recording(model, config.calib_samples)


def convert_compensated_(model: nn.Module, config, compensate) -> dict[str, Any]:
    """`convert` of every compensation method: base PTQ convert (unpacked), then `compensate(model, config, b)`."""
    batches = stop_recording(model)
    convert_ptq_(model, config.base_config, pack=False)
    return compensate(model, config, batches)


prepare_qwt_ = prepare_compensated_


def convert_qwt_(model: nn.Module, config: QwTConfig) -> dict[str, Any]:
    return convert_compensated_(model, config, compensate_qwt_)


def compensate_qwt_(model: nn.Module, config: QwTConfig, batches: list[Any]) -> dict[str, Any]:
    """QwT on a model already converted by the base PTQ with pack=False (then packs if the base config says so)."""
    spec = quant_state_of(model)["spec"]
    log = fit_qwt_(model, config, batches)
    if config.base_config.pack:
        pack_(model)
    spec["qwt"] = {str(e["block"]): e["comp"] for e in log if e["compensated"]}
    spec["compensation_log"] = log
    state = quant_state_of(model)
    state.update(spec=spec, config=config.to_dict())
    return spec


def prepare_qwt_for_loading_(model: nn.Module, spec: dict[str, Any], config: QwTConfig) -> None:
    prepare_ptq_for_loading_(model, spec, config.base_config)
    pipe = Pipeline(model)
    for idx, comp_spec in spec.get("qwt", {}).items():
        i = int(idx)
        pipe.backbone.blocks[i] = QwTBlock(pipe.backbone.blocks[i], build_compensation(comp_spec))
    quant_state_of(model).update(config=config.to_dict())
