"""The reference repository's raw `.bin` adapter file (`binary_adapter/utils.py`: `save_model` / `adapter2byte`),
byte for byte (spec side-tuning.md §5.2), so sizes compare with the released `models_bin/**.bin`.

No header. For every QLinear in storage order (blocks 0..L-1; per block AdaptFormer down, up, or LoRA q.down,
q.up, v.down, v.up; then the Bi-Head):

    ceil(numel * bits / 8) bytes   packed codebook indices, row-major, LSB-first (packing.py)
    4 bytes + 4 bytes              mu, sigma as float32 (little-endian; the reference writes native order)

then, without a Bi-Head, the FP32 head: weight (C, D) row-major, then bias (C,), float32.
A 32-bit adapter matrix (which the reference cannot serialize, its issue #21) is written as float32 row-major,
without mu/sigma: a thrifty extension, documented in docs/methods.md.
"""

from __future__ import annotations

import os
import struct

import numpy as np
import torch

from thrifty.errors import CheckpointError
from thrifty.io import atomic_write
from thrifty.tuners.lowbit.packing import pack_codes, packed_nbytes, unpack_codes
from thrifty.tuners.lowbit.quant import QLinear


def layer_bin_bytes(q: QLinear) -> int:
    """Bytes one QLinear takes in a `.bin`: packed codes + 8 (mu, sigma), or 4 per weight at 32 bits."""
    n = q.weight.numel()
    return packed_nbytes(n, q.bits) + 8 if q.quantized else 4 * n


def _f32(t: torch.Tensor) -> bytes:
    return t.detach().cpu().float().contiguous().numpy().astype("<f4").tobytes()


def bin_payload(model) -> bytes:
    """The `.bin` bytes of a low-bit model (a `LowBitModel`)."""
    out = bytearray()
    for _, q in model.lowbit_layers():
        if q.quantized:
            idx, mu, sigma = q.export_codes()
            out += pack_codes(idx, q.bits).numpy().tobytes()
            out += struct.pack("<ff", float(mu), float(sigma))
        else:
            out += _f32(q.weight)
    if not isinstance(model.head, QLinear):
        out += _f32(model.head.weight) + _f32(model.head.bias)
    return bytes(out)


def write_bin(model, path: str) -> int:
    """Write the `.bin` of `model` atomically; returns its size in bytes."""
    data = bin_payload(model)

    def _write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    atomic_write(path, _write)
    return len(data)


def read_bin(model, path: str) -> None:
    """Load a reference `.bin` into `model` (layers become frozen: the saved forward). The file has no header, so a
    file whose size differs from the model's layout (another backbone, dim, bits, head or C) is refused."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no .bin file at {path}")
    with open(path, "rb") as fh:
        data = fh.read()
    expected = model.bin_bytes()["bin_bytes"]
    if len(data) != expected:
        c = model.config
        raise CheckpointError(
            f"{path} has {len(data)} bytes; {c.method}(bits={c.bits}, dim={c.dim}, bi_head={c.bi_head}) on "
            f"{model.backbone.name} with {model.num_classes} classes needs exactly {expected}. The file was written "
            "for another backbone/config/number of classes, or it is truncated"
        )
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        pos += n
        return data[pos - n : pos]

    def floats(shape) -> torch.Tensor:
        n = int(np.prod(shape))
        return torch.from_numpy(np.frombuffer(take(4 * n), dtype="<f4").astype(np.float32).reshape(shape))

    with torch.no_grad():
        for name, q in model.lowbit_layers():
            if q.quantized:
                packed = torch.frombuffer(bytearray(take(packed_nbytes(q.weight.numel(), q.bits))), dtype=torch.uint8)
                idx = unpack_codes(packed, q.weight.numel(), q.bits, f"{path} ({name})")
                mu, sigma = struct.unpack("<ff", take(8))
                q.load_codes(idx, torch.tensor(mu), torch.tensor(sigma), f"{path} ({name})")
            else:
                q.weight.copy_(floats(tuple(q.weight.shape)))
        if not isinstance(model.head, QLinear):
            model.head.weight.copy_(floats(tuple(model.head.weight.shape)))
            model.head.bias.copy_(floats(tuple(model.head.bias.shape)))
