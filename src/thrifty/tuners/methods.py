"""Imports every built-in method package so that each registers itself."""

from thrifty.tuners import adaptformer, bi_adaptformer, bi_lora, dtl, full, last, linear, lora  # noqa: F401
