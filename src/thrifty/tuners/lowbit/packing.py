"""LSB-first bit packing of codebook indices (the reference's `adapter2byte` / `byte2adapter` layout).

The indices of one matrix (flattened row-major) form a bit stream: bit b of index i is stream bit i*bits + b, and
stream bit p lands in byte p // 8 at bit position p % 8 (least significant first). A matrix of n entries takes
ceil(n * bits / 8) bytes; the unused high bits of the last byte are zero.
"""

from __future__ import annotations

import torch

from thrifty.errors import CheckpointError


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes of `numel` packed `bits`-bit codes: ceil(numel * bits / 8)."""
    return (numel * bits + 7) // 8


def pack_codes(idx: torch.Tensor, bits: int) -> torch.Tensor:
    """(n,) integer codes in [0, 2**bits) -> (ceil(n*bits/8),) uint8, LSB-first."""
    idx = idx.reshape(-1).to(torch.int64).cpu()
    stream = ((idx[:, None] >> torch.arange(bits)) & 1).reshape(-1)  # (n*bits,)
    stream = torch.nn.functional.pad(stream, (0, (-stream.numel()) % 8))
    return (stream.view(-1, 8) << torch.arange(8)).sum(1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, numel: int, bits: int, source: str = "file") -> torch.Tensor:
    """Inverse of `pack_codes`: (nbytes,) uint8 -> (numel,) int64. Refuses a wrong length or non-zero padding."""
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != packed_nbytes(numel, bits):
        raise CheckpointError(
            f"{source}: expected {packed_nbytes(numel, bits)} packed bytes for {numel} {bits}-bit codes, got "
            f"{tuple(packed.shape)} {packed.dtype}; the file was written for another model or is truncated"
        )
    stream = ((packed.to(torch.int64)[:, None] >> torch.arange(8)) & 1).reshape(-1)
    if stream[numel * bits :].any():
        raise CheckpointError(f"{source}: non-zero padding bits after the last code; the file is corrupt")
    return (stream[: numel * bits].view(numel, bits) << torch.arange(bits)).sum(1)
