"""KV-head compression for LLMs ("Effectively Compress KV Heads for LLM", arXiv 2406.07056; compression.md §4):
merge the KV heads of every attention layer into fewer shared heads (MHA/GQA -> GQA) with SVD on calibration
activations (SVD-a), RoPE-aware keys, folded into q/o so a stock transformers model comes out.

    from thrifty.compress.kv_heads import KVHeadsConfig, compress_kv_heads_, save_compressed
    compress_kv_heads_(model, KVHeadsConfig(kv_heads=1), calib_batches)
    save_compressed(model, "out/", tokenizer=tok)
"""

from thrifty.compress.kv_heads import registration  # noqa: F401 (registers `kv_heads`)
from thrifty.compress.kv_heads.api import compress_kv_heads_, kv_heads_report
from thrifty.compress.kv_heads.config import KVHeadsConfig
from thrifty.compress.kv_heads.heal import default_heal_targets, heal_
from thrifty.compress.kv_heads.save import COMPRESSION_FILE, load_compressed, save_compressed
from thrifty.compress.kv_heads.sites import AttentionSite, find_attention_sites


__all__ = [
    "COMPRESSION_FILE",
    "AttentionSite",
    "KVHeadsConfig",
    "compress_kv_heads_",
    "default_heal_targets",
    "find_attention_sites",
    "heal_",
    "kv_heads_report",
    "load_compressed",
    "save_compressed",
]
