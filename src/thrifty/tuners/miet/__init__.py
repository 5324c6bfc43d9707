"""`miet`: Minimal Interaction Edge Tuning (arXiv 2406.17559; no public code: choices in docs/methods.md)."""

from thrifty.tuners.miet.config import MietConfig
from thrifty.tuners.miet.model import EdgeNetwork, MietModel, resolve_k
from thrifty.tuners.registry import register_method


register_method(MietConfig, MietModel)
__all__ = ["EdgeNetwork", "MietConfig", "MietModel", "resolve_k"]
