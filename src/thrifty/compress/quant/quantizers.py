"""Quantizers: uniform (per-tensor, per-segment, per-channel) and log2, with RepQ-ViT's percentile search.

Uniform affine quantization with `b` bits, scale `s`, zero point `z` and integer range `[qmin, qmax]`:

    q = clamp(round(x / s) + z, qmin, qmax),     x_hat = (q - z) * s

Activations are asymmetric unsigned (`qmin = 0`, `qmax = 2^b - 1`); weights: thrifty.compress.quant.weights.
Ranges come from RepQ-ViT's search (compression.md §1.5): candidate clipping ranges from the percentiles
{0.999, 0.9999, 0.99999} of the observed values, keep the one with the lowest L_p reconstruction error (p = 2).

Log2 quantizer (post-softmax attention, RepQ-ViT uses a log-sqrt2 variant): `q = clamp(round(-log2(x / D)), 0,
2^b - 1)`, `x_hat = D * 2^-q`, and values below the smallest level (`round(-log2(x/D)) > 2^b - 1`) become 0.

Lower bit widths than 8 are simulated inside the 8-bit containers: a clamp to the b-bit range followed by an 8-bit
fake quantization, which is exactly b-bit fake quantization and exports to ONNX as Clip + QuantizeLinear +
DequantizeLinear (an int8 engine runs it as int8).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


DEFAULT_PERCENTILES = (0.999, 0.9999, 0.99999)


@torch.library.custom_op("thrifty::fake_quant_uint8", mutates_args=())
def fake_quant_uint8(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, axis: int
) -> torch.Tensor:
    """Clip to [lo, hi] (the b-bit range), then uint8 quantize-dequantize as ONNX does:
    q = saturate(round_half_even(x / s) + z), x_hat = (q - z) * s. axis = -1: per tensor (0-d qparams);
    otherwise one (s, z) per index of dimension `axis` (qparams (S,), lo/hi broadcastable)."""
    x = torch.minimum(torch.maximum(x, lo), hi)
    if axis >= 0:
        shape = [1] * x.dim()
        shape[axis] = -1
        scale, zero_point = scale.view(shape), zero_point.view(shape)
    z = zero_point.to(x.dtype)
    return (torch.clamp(torch.round(x / scale) + z, 0, 255) - z) * scale


@fake_quant_uint8.register_fake
def _(x, scale, zero_point, lo, hi, axis):
    return torch.empty_like(x)


def eager(x: torch.Tensor) -> bool:
    """Whether `x` is a plain tensor in an eager run (no torch.compile / torch.export / jit trace): the simulated
    forward may then take the in-place paths below instead of the custom ops, which only matter to the exporter."""
    return type(x) is torch.Tensor and not torch.compiler.is_compiling() and not torch.jit.is_tracing()


def fake_quant(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, axis: int
) -> torch.Tensor:
    """`fake_quant_uint8`, bit for bit; in eager runs with one allocation and five passes instead of eight:

        clamp(x, lo, hi) / s -> round -> * s -> + 0.0

    Same values because [lo, hi] = [(qmin - z) s, (qmax - z) s] with 0 <= qmin, qmax <= 255, so round(x_c / s) is an
    integer in [-z, 255 - z] and `clamp(. + z, 0, 255) - z` is exact integer arithmetic that changes nothing but
    the sign of a zero (+ 0.0 turns -0.0 into the +0.0 the reference gives)."""
    if not eager(x) or x.dtype != scale.dtype:
        return fake_quant_uint8(x, scale, zero_point, lo, hi, axis)
    if axis >= 0:
        shape = [1] * x.dim()
        shape[axis] = -1
        scale = scale.view(shape)
    y = torch.clamp(x, lo, hi)
    return y.div_(scale).round_().mul_(scale).add_(0.0)


# --- integer ranges -----------------------------------------------------------------------------------------------
def act_range(bits: int) -> tuple[int, int]:
    return 0, 2**bits - 1


def quant_dequant(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Reference fake quantization with scale/zero point broadcast against `x` (used by the searches)."""
    return (torch.clamp(torch.round(x / scale) + zp, qmin, qmax) - zp) * scale


def quantiles(values: torch.Tensor, qs: Sequence[float]) -> torch.Tensor:
    """Row-wise quantiles, linear interpolation as torch.quantile, from one sort. (R, M) -> (len(qs), R)."""
    srt = values.sort(dim=1).values
    m = srt.shape[1]
    pos = torch.tensor(qs, dtype=torch.float64) * (m - 1)
    lo = pos.floor().long().clamp(0, m - 1)
    hi = pos.ceil().long().clamp(0, m - 1)
    frac = (pos - lo.double()).to(srt.dtype).to(srt.device)
    return srt[:, lo].T * (1 - frac[:, None]) + srt[:, hi].T * frac[:, None]


def _asym_params(lo: torch.Tensor, hi: torch.Tensor, qmin: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)  # the range always holds 0 (exact zero padding)
    scale = torch.clamp((hi - lo) / (qmax - qmin), min=1e-8)
    zp = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax)
    return scale, zp


def search_asymmetric(
    values: torch.Tensor, bits: int, percentiles: Sequence[float] = DEFAULT_PERCENTILES, p: float = 2.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row asymmetric search. values (R, M) -> scale (R,), zero_point (R,) in [0, 2^b - 1]."""
    qmin, qmax = act_range(bits)
    values = values.float()
    best_err = values.new_full((values.shape[0],), float("inf"))
    best_s, best_z = values.new_ones(values.shape[0]), values.new_zeros(values.shape[0])
    qs = quantiles(values, [*percentiles, *(1.0 - p for p in percentiles)])
    k = len(percentiles)
    for j in range(k):
        s, z = _asym_params(qs[k + j], qs[j], qmin, qmax)
        err = (values - quant_dequant(values, s[:, None], z[:, None], qmin, qmax)).abs().pow(p).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
    return best_s, best_z


# --- observer -----------------------------------------------------------------------------------------------------
class Reservoir:
    """A uniform random subsample (at most `capacity` values per segment) of everything observed, plus the count.

    Values arrive as (S, n); the kept sample stays uniform over all batches seen (proportional replacement)."""

    def __init__(self, capacity: int, seed: int = 0):
        self.capacity = int(capacity)
        self.values: torch.Tensor | None = None  # (S, m)
        self.seen = 0
        self.gen = torch.Generator().manual_seed(seed)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach()
        n = x.shape[1]
        total = self.seen + n
        room = self.capacity - (0 if self.values is None else self.values.shape[1])
        keep_new = min(n, max(room, round(self.capacity * n / total)))
        if keep_new == n:
            new = x.float().cpu()
        else:  # positions drawn with replacement: cheap for large tensors, uniform in expectation
            new = x[:, torch.randint(n, (keep_new,), generator=self.gen).to(x.device)].float().cpu()
        if self.values is None:
            self.values = new
        elif keep_new <= room:
            self.values = torch.cat([self.values, new], 1)
        else:  # overwrite random slots of the full reservoir
            free = torch.cat([self.values, new[:, :room]], 1)
            slots = torch.randperm(self.capacity, generator=self.gen)[: keep_new - room]
            free[:, slots] = new[:, room:]
            self.values = free
        self.seen = total


# --- activation quantizers ----------------------------------------------------------------------------------------
class ActQuantizer(nn.Module):
    """Layer-wise uniform asymmetric activation quantizer; `segments > 1` splits the last dim into equal parts with
    one (scale, zero point) each (used for the q | k | v output of a fused qkv projection).

    Modes: "observe" (record values, pass through), "quant" (fake-quantize), "off" (identity).
    """

    def __init__(self, segments: int = 1, observer_samples: int = 2**18, seed: int = 0):
        super().__init__()
        self.segments = int(segments)
        self.bits = 8
        self.mode = "off"
        self.register_buffer("scale", torch.ones(self.segments))
        self.register_buffer("zero_point", torch.zeros(self.segments, dtype=torch.int32))
        self.register_buffer("bounds", torch.zeros(2, self.segments))  # representable [lo, hi] per segment
        self._reservoir: Reservoir | None = None
        self._observer_samples, self._seed = observer_samples, seed

    def extra_repr(self) -> str:
        return f"bits={self.bits}, segments={self.segments}, mode={self.mode}"

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        """(..., C) -> (S, n) values per segment."""
        if self.segments == 1:
            return x.reshape(1, -1)
        return x.reshape(-1, self.segments, x.shape[-1] // self.segments).transpose(0, 1).reshape(self.segments, -1)

    def observe(self, x: torch.Tensor) -> None:
        if self._reservoir is None:
            self._reservoir = Reservoir(self._observer_samples, self._seed)
        self._reservoir.add(self._split(x))

    @property
    def observed(self) -> bool:
        return self._reservoir is not None and self._reservoir.seen > 0

    def calibrate(self, bits: int, percentiles: Sequence[float] = DEFAULT_PERCENTILES, p: float = 2.0) -> None:
        """Set the range from the observed values (RepQ-ViT's percentile search); 16 bits: stay float (off)."""
        if not self.observed:
            raise RuntimeError("activation quantizer saw no data; run calibration batches between prepare and convert")
        self.set_bits(bits)
        if self.float_bits:
            self.mode = "off"
            return
        scale, zp = search_asymmetric(self._reservoir.values, bits, percentiles, p)
        self.set_qparams(scale, zp)

    def set_bits(self, bits: int) -> None:
        self.bits = int(bits)

    @property
    def float_bits(self) -> bool:
        """16 bits = activations stay float (weight-only quantization)."""
        return self.bits >= 16

    def loaded_(self, bits: int) -> None:
        """State of a converted quantizer whose values come from a state dict."""
        self.set_bits(bits)
        self.mode = "off" if self.float_bits else "quant"

    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        qmin, qmax = act_range(self.bits)
        with torch.no_grad():
            self.scale.copy_(scale)
            self.zero_point.copy_(zero_point.round().to(torch.int32))
            self.bounds[0].copy_((qmin - self.zero_point) * self.scale)
            self.bounds[1].copy_((qmax - self.zero_point) * self.scale)
        self.mode = "quant"

    def drop_observations(self) -> None:
        self._reservoir = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "off":
            return x
        if self.mode == "observe":
            self.observe(x)
            return x
        if self.segments == 1:
            key = _memo_key(self, x)
            memo = x.__dict__.get(_MEMO) if key is not None else None
            if memo is not None and memo[0] == key:
                return memo[1]
            y = fake_quant(x, self.scale[0], self.zero_point[0], self.bounds[0, 0], self.bounds[1, 0], -1)
            if key is not None:
                x.__dict__[_MEMO] = (key, y)
            return y
        shape = x.shape
        y = x.reshape(*shape[:-1], self.segments, shape[-1] // self.segments)
        lo, hi = self.bounds[0, :, None], self.bounds[1, :, None]  # (S, 1) against (..., S, C / S)
        y = fake_quant(y, self.scale, self.zero_point, lo, hi, y.dim() - 2)
        return y.reshape(shape)


_MEMO = "_thrifty_fake_quant"


def _memo_key(q: ActQuantizer, x: torch.Tensor) -> tuple | None:
    """What makes a per-tensor fake quantization of `x` reusable: x unmodified (its version) and the same bits,
    scale, zero point and bounds. BERT's query, key and value quantize one hidden state with equal parameters (they
    observed the same values), so the second and third call reuse the first result, which stays attached to x
    (as long as x lives). None: no reuse (traced or inference tensors, or a graph that needs gradients)."""
    if not eager(x) or x.is_inference() or (x.requires_grad and torch.is_grad_enabled()):
        return None
    return (x._version, q.bits, *q.scale.tolist(), *q.zero_point.tolist(), *q.bounds.reshape(-1).tolist())


class Log2Quantizer(ActQuantizer):
    """Log2 quantizer for post-softmax probabilities: x_hat = D * 2^-q, q = clamp(round(-log2(x/D)), 0, 2^b - 1);
    levels below D * 2^-(2^b - 1) (and exact zeros) become 0. D is found by the same percentile search."""

    def calibrate(self, bits: int, percentiles: Sequence[float] = DEFAULT_PERCENTILES, p: float = 2.0) -> None:
        if not self.observed:
            raise RuntimeError("log2 quantizer saw no data; run calibration batches between prepare and convert")
        self.set_bits(bits)
        if self.float_bits:
            self.mode = "off"
            return
        values = self._reservoir.values.reshape(1, -1)
        best, best_err = None, float("inf")
        for delta in quantiles(values, (*percentiles, 1.0))[:, 0]:
            delta = torch.clamp(delta, min=1e-8)
            err = float((values - self._log2_qdq(values, delta)).abs().pow(p).sum())
            if err < best_err:
                best, best_err = delta, err
        with torch.no_grad():
            self.scale.fill_(float(best))
        self.mode = "quant"

    def _log2_qdq(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        levels = 2**self.bits - 1
        if eager(x) and x.dtype == delta.dtype:
            return _log2_qdq_inplace(x, delta, levels)
        q = torch.round(-torch.log2(torch.clamp(x, min=1e-30) / delta))
        x_hat = delta * torch.pow(2.0, -torch.clamp(q, 0, levels))
        return torch.where(q > levels, torch.zeros_like(x_hat), x_hat)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "off":
            return x
        if self.mode == "observe":
            self.observe(x)
            return x
        return self._log2_qdq(x, self.scale[0])


def _log2_qdq_inplace(x: torch.Tensor, delta: torch.Tensor, levels: int) -> torch.Tensor:
    """`Log2Quantizer._log2_qdq` bit for bit with two allocations instead of twelve: with r = round(log2(x_c / D)),
    q = -r (round half to even is odd-symmetric), so `q > levels` is `r < -levels` and -clamp(q, 0, levels) is
    clamp(r, -levels, 0) (a zero exponent of either sign gives 2^0 = 1). When even the smallest input 1e-30 stays
    above D * 2^-(levels - 1) (8 bits and D < 8e7: always) neither the zeroing nor the lower clamp can apply."""
    r = torch.clamp(x, min=1e-30).div_(delta).log2_().round_()
    d = float(delta)
    if 0 < d < math.inf and math.log2(1e-30 / d) > max(1.0 - levels, -126.0):  # x_c >= 1e-30: r > -levels
        torch.pow(2.0, r.clamp_(max=0), out=r)
        return r.mul_(delta)
    under = r < -levels
    r.clamp_(-levels, 0)
    torch.pow(2.0, r, out=r)
    return r.mul_(delta).masked_fill_(under, 0.0)
