"""Low-bit adapter machinery shared by `bi_lora` and `bi_adaptformer` (Jie et al., ICCV 2023): the QLinear
quantizer (Gaussian L1-optimal codebook, straight-through gradients), LSB-first packing, the packed safetensors
format and the reference's raw `.bin` layout."""

from thrifty.tuners.lowbit.binfile import bin_payload, layer_bin_bytes, read_bin, write_bin
from thrifty.tuners.lowbit.model import LowBitAdapter, LowBitConfig, LowBitModel
from thrifty.tuners.lowbit.packing import pack_codes, packed_nbytes, unpack_codes
from thrifty.tuners.lowbit.quant import QLinear, codebook, gaussian_l1_levels, ste_weight


__all__ = [
    "LowBitAdapter",
    "LowBitConfig",
    "LowBitModel",
    "QLinear",
    "bin_payload",
    "codebook",
    "gaussian_l1_levels",
    "layer_bin_bytes",
    "pack_codes",
    "packed_nbytes",
    "read_bin",
    "ste_weight",
    "unpack_codes",
    "write_bin",
]
