"""`lora`: low-rank updates injected into targeted linear layers (PEFT semantics and file format)."""

from thrifty.tuners.lora.config import LoraConfig
from thrifty.tuners.lora.layer import LoraConv2d, LoraLinear
from thrifty.tuners.lora.model import LoraModel
from thrifty.tuners.registry import register_method


register_method(LoraConfig, LoraModel)
__all__ = ["LoraConfig", "LoraConv2d", "LoraLinear", "LoraModel"]
