"""Process and device settings every layer shares: device choice and autocast, glibc malloc tuning, and
flushing subnormal floats on torch's CPU threads. Sits beside `io` at the bottom of the layers."""

from thrifty.runtime.allocator import MALLOC_MODES, tune_malloc
from thrifty.runtime.denormals import flushed_denormals
from thrifty.runtime.device import autocast, resolve_device, to_device


__all__ = ["MALLOC_MODES", "autocast", "flushed_denormals", "resolve_device", "to_device", "tune_malloc"]
