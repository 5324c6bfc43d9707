"""DC-ViT: few-shot dense compression of vision transformers (Zhang et al., CVPR 2024; spec compression.md §3).

    config = DCViTConfig(keep_macs=0.75, samples=50)
    compress_dc_vit_(model, config, few_shot_batches)        # in place: rank blocks, compress progressively
    save_dc_vit(model, "out/")                               # model.safetensors (timm/HF keys) + compression.json
    model, info = load_dc_vit("out/")
    compress_dc_vit_family(model, config, [0.9, 0.8, 0.7], few_shot_batches, "family/")   # dense output

Pipeline: structure from the MAC budget (structure.py, MACs counted by torch.utils.flop_counter on the model,
macs.py) -> the compressed block (attention branch removed, a subset of MLP units kept; block.py, units.py) -> rank
candidate blocks by recoverability (ranking.py) -> progressive compression with MSE feature mimicking on the
final-norm tokens (progressive.py, recover.py). Labels are never read. `variant="block_drop"` is the baseline that
drops whole blocks, ranked and recovered the same way.
"""

from thrifty.compress.dc_vit.api import compress_dc_vit_, compress_dc_vit_family, structure_for
from thrifty.compress.dc_vit.block import DroppedBlock, FFNBertLayer, FFNBlock, block_ops
from thrifty.compress.dc_vit.config import DCViTConfig
from thrifty.compress.dc_vit.macs import MacProfile, count_macs
from thrifty.compress.dc_vit.serialize import MANIFEST, WEIGHTS, latency_ms, load_dc_vit, save_dc_vit
from thrifty.compress.dc_vit.structure import (
    Structure,
    apply_structure_,
    block_drop_structure,
    dc_vit_structure,
    profile_macs,
)


__all__ = [
    "MANIFEST",
    "WEIGHTS",
    "DCViTConfig",
    "DroppedBlock",
    "FFNBertLayer",
    "FFNBlock",
    "MacProfile",
    "Structure",
    "apply_structure_",
    "block_drop_structure",
    "block_ops",
    "compress_dc_vit_",
    "compress_dc_vit_family",
    "count_macs",
    "dc_vit_structure",
    "latency_ms",
    "load_dc_vit",
    "profile_macs",
    "save_dc_vit",
    "structure_for",
]


from thrifty.compress.dc_vit import registration  # noqa: F401 (registers `dc_vit`)
