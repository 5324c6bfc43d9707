"""PyTorch serving path: thrifty's quantized model on torchao's int8 tensor subclass and torch's CPU int4 kernel.

`to_torchao_(model, TorchaoServingConfig(mode=...))` rewrites a converted PTQ / QwT / QwT-v2 model in place:

- every `QuantLinear` becomes a `ServingLinear` whose weight holds thrifty's own integer codes (not re-quantized),
  with QwT-v2's CWAC folded first (s_w,c <- a_c s_w,c, bias_c <- a_c bias_c + beta_c, as `fold_cwac_`);
- `mode="int8_dynamic"`: torchao's `Int8Tensor` with per-token symmetric dynamic activation quantization (the form
  `Int8DynamicActivationInt8WeightConfig` builds): y = (X_int8 W_int8^T) s_x,t s_w,c + bias, through
  `torch._int_mm`;
- `mode="int8_static"`: the same tensor with thrifty's calibrated per-tensor activation scale and zero point
  (the form of `Int8StaticActivationInt8WeightConfig`, asymmetric); for `a_bits=8` every linear computes what the
  simulation computes: q_x = clamp(round(x / s_x) + z_x), y = s_x s_w,c sum_k (q_x - z_x)_k W_ck + bias_c;
- `mode="int4_weight_only"` (W4A16): FALLBACK, not torchao. torchao 0.18.0 (the only version pip resolves next to
  torch 2.14.1) has no CPU format for `Int4WeightOnlyConfig`: "plain" raises `ImportError: Requires mslk >= 1.0.0`,
  "tile_packed_to_4d" needs CUDA ("Found no NVIDIA driver on your system") and "plain_int32" raises
  `NotImplementedError: Int4PlainInt32Tensor does not support device 'cpu' yet`. We call the kernel torchao's
  CPU int4 layout used up to 0.14 (`aten._weight_int4pack_mm_for_cpu`, packed by
  `aten._convert_weight_to_int4pack_for_cpu`): w = (q - 8) * scale_g + zero_g per group of `group_size` inputs,
  with thrifty's per-channel scale repeated over the groups (exact for w_bits <= 4); layers kept at 8 bits
  (`edge_bits`, the classifier) and shapes the kernel rejects (out_features not a multiple of 16, in_features
  not a multiple of the group) take the int8_dynamic form. Activations of int4 layers run in bfloat16,
  the dtype of the kernel's fast path (float32 inputs hit a path about 100x slower on this CPU).

- `mode="int8_dynamic_torch"`: not torchao: torch's own dynamic int8 linear (`torch.ao.nn.quantized.dynamic.Linear`,
  fbgemm's `quantized::linear_dynamic`: per-tensor dynamic uint8 activations) holding thrifty's codes as a
  per-channel qint8 tensor. In eager mode it is the fastest int8 form on this CPU (torchao's Int8Tensor dispatches
  through Python per call: 4x slower than float32 for one token, see docs/benchmarks-more.md). torch 2.14 marks
  its quantized-tensor constructors deprecated (a UserWarning); torchao is their announced successor.

Everything else runs in float: the attention quantizers (q/k/v output quantizers, the post-softmax quantizer) are
simulation points with no PyTorch kernel behind them and are removed (attention goes back to SDPA); QwT's
compensation branches stay as they are (float16 x W + b, not foldable); `QuantConv2d` becomes a float Conv2d with
the dequantized, compensation-folded weight. `embeddings=True` also stores nn.Embedding tables as torchao
`Int8Tensor` (int8 per row, weight-only; the lookup dequantizes). `quantize_float_linears_` gives the same forms for
a float model (round-to-nearest), used for the LLM benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from thrifty.compress.quant.layers import QuantConv2d, QuantLinear, SoftmaxQuant, _QuantWeightLayer
from thrifty.compress.quant.ptq import quant_state_of
from thrifty.errors import ConfigError
from thrifty.tuners.targeting import set_submodule
from thrifty.values import check


MODES = ("int8_dynamic", "int8_static", "int4_weight_only", "int8_dynamic_torch")
INT4_GROUPS = (32, 64, 128, 256)


@dataclass
class TorchaoServingConfig:
    """How `to_torchao_` stores and runs the quantized linears."""

    mode: str = field(
        default="int8_dynamic", metadata={"help": "int8_dynamic | int8_static | int4_weight_only | int8_dynamic_torch"}
    )
    group_size: int = field(default=128, metadata={"help": "int4: inputs per scale group (32, 64, 128, 256)"})
    embeddings: bool = field(default=False, metadata={"help": "store nn.Embedding tables as int8 per row"})

    def __post_init__(self) -> None:
        check(self.mode in MODES, f"`mode` must be one of {MODES}, got {self.mode!r}")
        check(self.group_size in INT4_GROUPS, f"`group_size` must be one of {INT4_GROUPS}, got {self.group_size!r}")


def _torchao():
    try:
        import torchao  # noqa: F401
        from torchao.quantization import PerRow, PerTensor
        from torchao.quantization.quant_primitives import MappingType
        from torchao.quantization.quantize_.workflows.int8.int8_tensor import Int8Tensor, QuantizeTensorToInt8Kwargs
    except ImportError as e:
        raise ConfigError(f"the torchao serving path needs torchao (pip install torchao==0.18.0): {e}") from e
    return Int8Tensor, QuantizeTensorToInt8Kwargs, PerRow, PerTensor, MappingType


class ServingLinear(nn.Module):
    """y = F.linear(x, W, bias) with W a torchao Int8Tensor; x flattened to (tokens, in) so a per-tensor static
    activation scale (shape (1, 1)) matches the 2-D input torchao's static path expects."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x.reshape(-1, self.in_features), self.weight, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)


class Int4Linear(nn.Module):
    """W4A16 linear on torch's CPU int4 kernel. Buffers: `packed` uint8 (out, in / 2) from
    `_convert_weight_to_int4pack_for_cpu`, `scales_zeros` (in / group, out, 2) float32; the weight is
    W[c, k] = (q[c, k] - 8) * scale[k // group, c] + zero[k // group, c]."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int, bias):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.group_size = int(group_size)
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1))
        self.register_buffer("scales_zeros", torch.stack([scale, zero], -1).float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self._compute = self.scales_zeros.to(torch.bfloat16)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self._compute = self.scales_zeros.to(torch.bfloat16)
        return out

    def dequantized(self) -> torch.Tensor:
        """The (out, in) float weight the kernel multiplies by (for tests and size checks)."""
        q = _unpack_int4(self.packed, self.out_features, self.in_features).float() - 8
        g = self.in_features // self.group_size
        sz = self.scales_zeros.transpose(0, 1)  # (out, groups, 2)
        w = q.view(self.out_features, g, self.group_size) * sz[..., :1] + sz[..., 1:]
        return w.view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group_size, self._compute).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def int4_fits(out_features: int, in_features: int, group_size: int) -> bool:
    """The CPU int4 kernel's shape rules: out_features a multiple of 16, in_features a multiple of the group."""
    return out_features % 16 == 0 and in_features % group_size == 0


def _unpack_int4(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of the CPU packing (round trip through the kernel on the identity): (n, k) int values 0..15."""
    eye = torch.eye(k, dtype=torch.bfloat16)
    sz = torch.stack([torch.ones(k // 32, n), torch.zeros(k // 32, n)], -1).to(torch.bfloat16)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, packed, 32, sz).t().float().round().to(torch.int32) + 8


def _folded(layer: _QuantWeightLayer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, zero point, scale, bias) with any unfolded CWAC applied: s <- a s, bias <- a bias + beta."""
    if not layer.converted:
        raise ConfigError("to_torchao_ needs a converted quantized model (quantize_ with step='convert' first)")
    if layer.weight_block_size:
        raise ConfigError(
            "to_torchao_ takes per-channel weight scales; this model has block scales (weight_block_size="
            f"{layer.weight_block_size}): quantize with weight_block_size=None, or deploy it through the ONNX export"
        )
    scale, bias = layer.weight_scale.float(), layer.bias.detach().float()
    if layer.cwac_a is not None:
        scale, bias = scale * layer.cwac_a, bias * layer.cwac_a + layer.cwac_beta
    return layer.weight_codes, layer.weight_zero_point, scale, bias


def int8_linear(codes, zero_point, scale, bias, *, static: tuple[float, int] | None = None) -> ServingLinear:
    """A ServingLinear holding the given int8 codes (symmetric, zero point 0); `static=(s_x, z_x)` uses that
    per-tensor activation quantization (z_x on the uint8 grid), else torchao's per-token dynamic one."""
    Int8Tensor, Kwargs, PerRow, PerTensor, MappingType = _torchao()
    if codes.dtype != torch.int8 or bool((zero_point != 0).any()):
        raise ConfigError(
            "torchao's int8 kernels take symmetric weights (zero point 0); quantize with weight_symmetric=True"
        )
    n, k = codes.shape
    kw: dict[str, Any] = {}
    if static is None:
        kw["act_quant_kwargs"] = Kwargs(granularity=PerRow(), mapping_type=MappingType.SYMMETRIC)
    else:
        s_x, z_x = static
        kw["act_quant_kwargs"] = Kwargs(granularity=PerTensor(), mapping_type=MappingType.ASYMMETRIC)
        kw["act_quant_scale"] = torch.full((1, 1), float(s_x))
        kw["act_quant_zero_point"] = torch.full((1, 1), int(z_x) - 128, dtype=torch.int8)  # uint8 grid -> int8
    w = Int8Tensor(codes.contiguous(), scale.float().view(n, 1), [1, k], torch.float32, **kw)
    return ServingLinear(w, bias)


def torch_dynamic_linear(codes, zero_point, scale, bias) -> nn.Module:
    """torch.ao's dynamic quantized Linear (fbgemm) holding the given symmetric int8 codes, per-channel scales."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    if codes.dtype != torch.int8 or bool((zero_point != 0).any()):
        raise ConfigError(
            "int8_dynamic_torch takes symmetric weights (zero point 0); quantize with weight_symmetric=True"
        )
    n, k = codes.shape
    zeros = torch.zeros(n, dtype=torch.long)
    q = torch._make_per_channel_quantized_tensor(codes.contiguous(), scale.double().contiguous(), zeros, 0)
    layer = DynamicLinear(k, n, dtype=torch.qint8)
    layer.set_weight_bias(q, None if bias is None else bias.detach().float().contiguous())
    return layer


def int4_linear(codes, zero_point, scale, bias, group_size: int) -> Int4Linear:
    """Per-channel int4 codes (w = (codes - z) s) as the CPU int4 kernel's groups: q = codes - z + 8 stays in
    0..15 for symmetric codes; asymmetric uint codes q = codes, zero = (8 - z) s."""
    n, k = codes.shape
    if k % group_size:
        raise ConfigError(f"int4: in_features {k} is not a multiple of group_size {group_size}; pick another one")
    z = zero_point.to(torch.int32).view(n, 1)
    if codes.dtype == torch.int8:
        q, zero = codes.to(torch.int32) - z + 8, torch.zeros(n)
    else:
        q, zero = codes.to(torch.int32), (8 - z.view(n).float()) * scale
    if int(q.min()) < 0 or int(q.max()) > 15:
        raise ConfigError("int4_weight_only needs weights quantized to at most 4 bits (e.g. --bits w4a8)")
    groups = k // group_size
    return Int4Linear(q, scale.float().expand(groups, n), zero.float().expand(groups, n), group_size, bias)


def _float_attention_(model: nn.Module) -> int:
    """Remove the simulation-only attention quantizers; HF attention goes back to SDPA, timm's to its fused path."""
    n = 0
    for m in list(model.modules()):
        if isinstance(getattr(m, "thrifty_softmax_quant", None), SoftmaxQuant):
            del m.thrifty_softmax_quant
            m.config._attn_implementation = "sdpa"
            n += 1
        elif isinstance(getattr(m, "attn_drop", None), SoftmaxQuant):
            m.attn_drop, m.fused_attn = m.attn_drop.inner, True
            n += 1
    return n


def _int8_embedding_(emb: nn.Embedding) -> None:
    Int8Tensor, _, PerRow, _, _ = _torchao()
    emb.weight = nn.Parameter(Int8Tensor.from_hp(emb.weight.detach().float(), PerRow()), requires_grad=False)


@torch.no_grad()
def to_torchao_(model: nn.Module, config: TorchaoServingConfig | None = None) -> dict[str, int]:
    """Rewrite a converted thrifty quantized model for PyTorch serving (see the module docstring), in place.
    Returns counts: linears, int4 linears, convs made float, attention quantizers removed, embeddings."""
    config = config or TorchaoServingConfig()
    if quant_state_of(model) is None:
        raise ConfigError("to_torchao_ takes a thrifty quantized model (quantize_ / load_quantized first)")
    if config.mode == "int4_weight_only" and not any(
        isinstance(m, QuantLinear) and m.w_bits <= 4 for m in model.modules()
    ):
        raise ConfigError("int4_weight_only needs weights quantized to at most 4 bits (e.g. --bits w4a8)")
    counts = {"linear": 0, "int4": 0, "conv_float": 0, "attention_float": _float_attention_(model), "embedding": 0}
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantLinear):
            codes, zp, scale, bias = _folded(m)
            if config.mode == "int8_dynamic_torch":
                new: nn.Module = torch_dynamic_linear(codes, zp, scale, bias)
            elif config.mode == "int4_weight_only" and m.w_bits <= 4 and int4_fits(*codes.shape, config.group_size):
                new = int4_linear(codes, zp, scale, bias, config.group_size)
                counts["int4"] += 1
            elif config.mode == "int4_weight_only":  # 8-bit edge layers (PTQConfig.edge_bits), odd shapes: int8
                new = int8_linear(codes, zp, scale, bias)
            else:
                static = None
                if config.mode == "int8_static":
                    q = m.input_quantizer
                    if q.bits != 8 or q.segments != 1:
                        raise ConfigError(
                            f"int8_static reuses thrifty's 8-bit per-tensor input scales; {name} has a_bits={q.bits}"
                            "; use mode='int8_dynamic' or quantize with 8-bit activations"
                        )
                    static = (float(q.scale[0]), int(q.zero_point[0]))
                new = int8_linear(codes, zp, scale, bias, static=static)
            set_submodule(model, name, new)
            counts["linear"] += 1
        elif isinstance(m, QuantConv2d):
            codes, zp, scale, bias = _folded(m)
            conv = nn.Conv2d(m.in_channels, m.out_channels, codes.shape[-1], m.stride, m.padding, m.dilation, m.groups)
            w = (codes.float() - zp.float().view(-1, 1, 1, 1)) * scale.view(-1, 1, 1, 1)
            conv.weight, conv.bias = nn.Parameter(w, requires_grad=False), nn.Parameter(bias, requires_grad=False)
            set_submodule(model, name, nn.Sequential(m.pad, conv) if not isinstance(m.pad, nn.Identity) else conv)
            counts["conv_float"] += 1
    if config.embeddings:
        for m in model.modules():
            if isinstance(m, nn.Embedding):
                _int8_embedding_(m)
                counts["embedding"] += 1
    quant_state_of(model)["serving"] = {"mode": config.mode, "group_size": config.group_size, **counts}
    return counts


@torch.no_grad()
def quantize_float_linears_(
    model: nn.Module, config: TorchaoServingConfig | None = None, filter_fn=None
) -> dict[str, int]:
    """Round-to-nearest serving quantization of a FLOAT model's nn.Linear layers (no calibration): int8 per-channel
    symmetric weights (narrow range, as thrifty's) or int4 groups (asymmetric min/max per group, the tinygemm
    parametrisation). `filter_fn(module, fqn)` selects layers (default: every Linear)."""
    config = config or TorchaoServingConfig()
    if config.mode == "int8_static":
        raise ConfigError("int8_static needs calibrated activation scales: quantize with thrifty first")
    n = 0
    for name, m in list(model.named_modules()):
        if type(m) is not nn.Linear or (filter_fn is not None and not filter_fn(m, name)):
            continue
        w = m.weight.detach().float()
        bias = None if m.bias is None else m.bias.detach()
        if config.mode == "int4_weight_only" and int4_fits(*w.shape, config.group_size):
            new: nn.Module = _rtn_int4(w, bias, config.group_size)
        else:
            scale = (w.abs().amax(1) / 127).clamp_min(1e-12)
            codes = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
            zp = torch.zeros(w.shape[0], dtype=torch.int8)
            make = torch_dynamic_linear if config.mode == "int8_dynamic_torch" else int8_linear
            new = make(codes, zp, scale, bias)
        set_submodule(model, name, new)
        n += 1
    if config.embeddings:
        for m in model.modules():
            if isinstance(m, nn.Embedding):
                _int8_embedding_(m)
    return {"linear": n}


def _rtn_int4(w: torch.Tensor, bias, group_size: int) -> Int4Linear:
    n, k = w.shape
    if k % group_size:
        raise ConfigError(f"int4: in_features {k} is not a multiple of group_size {group_size}")
    g = w.view(n, k // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-8)  # (n, groups)
    q = torch.clamp(torch.round((g - lo[..., None]) / scale[..., None]), 0, 15)
    zero = lo + 8 * scale  # w = q s + lo = (q - 8) s + (lo + 8 s)
    return Int4Linear(q.view(n, k).to(torch.int32), scale.t(), zero.t(), group_size, bias)


def serving_bytes(model: nn.Module) -> int:
    """Bytes of the model's state: tensor subclasses count their inner tensors (codes, scales), not the logical
    float shape; duplicate storages are counted once."""
    seen: set[int] = set()
    total = 0

    def add(t: Any) -> None:
        nonlocal total
        if isinstance(t, (tuple, list)):  # torch.ao's packed params: (qweight, bias)
            for x in t:
                add(x)
            return
        if not isinstance(t, torch.Tensor):
            return
        if t.is_quantized:  # int8 codes + per-channel float64 scales and int64 zero points
            total += t.int_repr().nbytes + (t.q_per_channel_scales().nbytes + t.q_per_channel_zero_points().nbytes)
            return
        if hasattr(t, "__tensor_flatten__"):
            names, _ = t.__tensor_flatten__()
            for k in names:
                add(getattr(t, k))
            return
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()

    for t in model.state_dict(keep_vars=True).values():
        add(t)
    return total
