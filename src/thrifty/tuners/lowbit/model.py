"""Shared pieces of the low-bit adapters (Bi-AdaptFormer, Bi-LoRA): config, the adapter module and a `TunedModel`
base whose files hold packed codes instead of float weights.

adapter_model.safetensors of a low-bit model (every quantized matrix in the reference's `.bin` order: blocks
0..L-1, per block its adapter matrices, then the 1-bit head if any):

    lowbit.codes   uint8 (sum_m ceil(numel_m * bits_m / 8),)  each matrix's LSB-first packed indices, concatenated
    lowbit.mean    float32 (M,)                                per-matrix mean mu
    lowbit.std     float32 (M,)                                per-matrix std sigma
    lowbit.layout  int32 (M, 3)                                (out, in, bits) per matrix: refuses foreign files
    <key>.weight   float32                                     32-bit adapters (bits=32: no quantization)
    head.weight / head.bias                                    the FP32 head when `bi_head` is false

One concatenated codes tensor (not one tensor per matrix) keeps the safetensors header small: per-matrix keys
would add ~330 B of JSON per matrix, more than the 104 B of codes of a dim-1 matrix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from thrifty.errors import CheckpointError
from thrifty.tuners.base import TunedModel
from thrifty.tuners.config import TunerConfig, check
from thrifty.tuners.lowbit.packing import pack_codes, packed_nbytes, unpack_codes
from thrifty.tuners.lowbit.quant import SUPPORTED_BITS, QLinear


CODES, MEAN, STD, LAYOUT = "lowbit.codes", "lowbit.mean", "lowbit.std", "lowbit.layout"


@dataclass
class LowBitConfig(TunerConfig):
    """Options shared by `bi_lora` and `bi_adaptformer` (spec side-tuning.md §5)."""

    aliases: ClassVar[dict[str, str]] = {"bit": "bits", "s": "scale", "bihead": "bi_head"}

    bits: int = field(default=1, metadata={"help": "Bits per adapter weight: 1, 2, 4, 8, or 32 (no quantization)."})
    dim: int = field(default=32, metadata={"help": "Hidden width of each adapter (the paper uses 32 or 1)."})
    scale: float = field(default=1.0, metadata={"help": "s, searched per task in {0.01, 0.1, 1, 10, 100}."})
    dropout: float = field(default=0.1, metadata={"help": "Dropout on the adapter's hidden activation."})
    bi_head: bool = field(default=False, metadata={"help": "Replace the FP32 head by a 1-bit bias-free QLinear."})

    def __post_init__(self) -> None:
        check(self.bits in SUPPORTED_BITS, f"`bits` must be one of {SUPPORTED_BITS}, got {self.bits!r}")
        check(isinstance(self.dim, int) and self.dim > 0, f"`dim` must be a positive integer, got {self.dim!r}")
        check(0.0 <= self.dropout < 1.0, f"`dropout` must be in [0, 1), got {self.dropout!r}")
        check(isinstance(self.bi_head, bool), f"`bi_head` must be true or false, got {self.bi_head!r}")


class LowBitAdapter(nn.Module):
    """up(dropout(act(down(x)))): (..., d_in) -> (..., d_out); down (dim, d_in) and up (d_out, dim) bias-free.

    Init (reference): down = PyTorch's default Linear init; up = zeros at 32 bits, else
    trunc_normal(0, 0.001, a=-0.002, b=0.002) (an all-zero matrix has sigma = 0 and cannot be normalized)."""

    def __init__(self, d_in: int, dim: int, d_out: int, bits: int, dropout: float, relu: bool):
        super().__init__()
        self.down = QLinear(d_in, dim, bits)
        self.up = QLinear(dim, d_out, bits)
        self.act = nn.ReLU() if relu else nn.Identity()
        self.dropout = nn.Dropout(dropout)
        if bits == 32:
            nn.init.zeros_(self.up.weight)
        else:
            nn.init.trunc_normal_(self.up.weight, mean=0.0, std=0.001, a=-0.002, b=0.002)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.dropout(self.act(self.down(x))))


class LowBitModel(TunedModel):
    """Base of the low-bit methods. Subclasses build adapters in `_inject()` and list them, in the reference's
    storage order, in `adapter_list()`."""

    def _setup(self) -> None:
        self._inject()
        if self.config.bi_head:
            ref = self.head.weight
            self.head = QLinear(self.backbone.num_features, self.num_classes, bits=1, device=ref.device)

    def _inject(self) -> None:
        raise NotImplementedError

    def adapter_list(self) -> list[LowBitAdapter]:
        raise NotImplementedError

    # --- layers in storage order -----------------------------------------------------------------------------
    def lowbit_layers(self) -> list[tuple[str, QLinear]]:
        """(module path, layer) of every QLinear in `.bin` order: per adapter down then up; the Bi-Head last."""
        names = {id(m): n for n, m in self.named_modules()}
        layers = [(names[id(m)], m) for a in self.adapter_list() for m in (a.down, a.up)]
        if isinstance(self.head, QLinear):
            layers.append(("head", self.head))
        return layers

    def _layout(self) -> torch.Tensor:
        rows = [[q.out_features, q.in_features, q.bits] for _, q in self.lowbit_layers() if q.quantized]
        return torch.tensor(rows, dtype=torch.int32).reshape(-1, 3)

    # --- state -----------------------------------------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Packed codes + per-matrix mean/std (see module docstring); float weights only for 32-bit layers."""
        state: dict[str, torch.Tensor] = {}
        codes, means, stds = [], [], []
        for name, q in self.lowbit_layers():
            if q.quantized:
                idx, mu, sigma = q.export_codes()
                codes.append(pack_codes(idx, q.bits))
                means.append(mu.reshape(1))
                stds.append(sigma.reshape(1))
            else:
                state[self._file_key(name) + ".weight"] = q.weight.detach().float().cpu()
        if codes:
            state.update({CODES: torch.cat(codes), MEAN: torch.cat(means), STD: torch.cat(stds)})
            state[LAYOUT] = self._layout()
        if not isinstance(self.head, QLinear):
            state["head.weight"] = self.head.weight.detach().cpu()
            state["head.bias"] = self.head.bias.detach().cpu()
        return state

    def _expected_keys(self) -> set[str]:
        keys = {self._file_key(n) + ".weight" for n, q in self.lowbit_layers() if not q.quantized}
        if any(q.quantized for _, q in self.lowbit_layers()):
            keys |= {CODES, MEAN, STD, LAYOUT}
        if not isinstance(self.head, QLinear):
            keys |= {"head.weight", "head.bias"}
        return keys

    def _refuse(self, source: str, what: str) -> CheckpointError:
        c = self.config
        return CheckpointError(
            f"{source} does not fit {c.method}(bits={c.bits}, dim={c.dim}, bi_head={c.bi_head}) on "
            f"{self.backbone.name} with {self.num_classes} classes: {what}. It was saved for another backbone or "
            "config, or it is truncated"
        )

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Load packed codes (layers become frozen: exactly the saved forward) and float weights; refuse others."""
        wanted = self._expected_keys()
        if wanted != set(state):
            missing, unexpected = sorted(wanted - state.keys()), sorted(state.keys() - wanted)
            raise self._refuse(source, f"missing {missing[:4]}, unexpected {unexpected[:4]}")
        quantized = [(n, q) for n, q in self.lowbit_layers() if q.quantized]
        if quantized:
            layout = self._layout()
            if state[LAYOUT].shape != layout.shape or not torch.equal(state[LAYOUT].to(layout.dtype), layout):
                raise self._refuse(
                    source,
                    f"it holds matrices (out, in, bits) {state[LAYOUT].tolist()[:3]}... "
                    f"({len(state[LAYOUT])}), this model has {layout.tolist()[:3]}... ({len(layout)})",
                )
            sizes = [packed_nbytes(q.weight.numel(), q.bits) for _, q in quantized]
            for key, n in ((CODES, sum(sizes)), (MEAN, len(quantized)), (STD, len(quantized))):
                if state[key].dim() != 1 or state[key].numel() != n:
                    raise self._refuse(source, f"{key} has shape {tuple(state[key].shape)}, expected ({n},)")
            chunks = torch.split(state[CODES], sizes)
            for i, ((name, q), packed) in enumerate(zip(quantized, chunks)):
                idx = unpack_codes(packed, q.weight.numel(), q.bits, f"{source} ({name})")
                q.load_codes(idx, state[MEAN][i], state[STD][i], f"{source} ({name})")
        params = dict(self.named_parameters())
        floats = {self._file_key(n) + ".weight": n + ".weight" for n, q in self.lowbit_layers() if not q.quantized}
        if not isinstance(self.head, QLinear):
            floats.update({"head.weight": "head.weight", "head.bias": "head.bias"})
        with torch.no_grad():
            for key, pname in floats.items():
                p, value = params[pname], state[key]
                if p.shape != value.shape:
                    raise self._refuse(source, f"{key} has shape {tuple(value.shape)}, expected {tuple(p.shape)}")
                p.copy_(value)

    def train(self, mode: bool = True) -> LowBitModel:
        """Training a loaded (frozen) model re-enables fake quantization of its trainable layers."""
        super().train(mode)
        if mode:
            for _, q in self.lowbit_layers():
                if q.frozen and q.weight.requires_grad:
                    q.unfreeze_()
        return self

    def adapter_modules(self) -> list[nn.Module]:
        return list(self.adapter_list())

    # --- sizes -----------------------------------------------------------------------------------------------
    def bin_bytes(self) -> dict[str, int]:
        """Size of the reference's raw `.bin` (see lowbit/binfile.py), split into adapters and head."""
        from thrifty.tuners.lowbit.binfile import layer_bin_bytes

        adapters = sum(layer_bin_bytes(q) for n, q in self.lowbit_layers() if n != "head")
        head = (
            layer_bin_bytes(self.head)
            if isinstance(self.head, QLinear)
            else 4 * sum(p.numel() for p in self.head.parameters())
        )
        return {"bin_adapter_bytes": adapters, "bin_head_bytes": head, "bin_bytes": adapters + head}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "bits": self.config.bits, **self.bin_bytes()}
