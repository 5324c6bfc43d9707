"""Imports every built-in method package so that each registers itself."""

from thrifty.tuners import adaptformer, full, linear, lora  # noqa: F401
