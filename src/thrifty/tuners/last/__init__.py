"""`last`: Low-rank Attention Side-Tuning, LAST-like (arXiv 2402.04009; no public code: choices documented)."""

from thrifty.tuners.last.config import LastConfig
from thrifty.tuners.last.lsa import LowRankSelfAttention
from thrifty.tuners.last.model import LastModel, LastSideNetwork
from thrifty.tuners.registry import register_method


register_method(LastConfig, LastModel)
__all__ = ["LastConfig", "LastModel", "LastSideNetwork", "LowRankSelfAttention"]
