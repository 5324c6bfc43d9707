"""Measurement kit: the same meters for every method."""

from thrifty.metrics.env import environment
from thrifty.metrics.memory import (
    cpu_peak_growth,
    saved_activation_bytes,
    training_step,
)


def accuracy(logits, labels) -> float:
    """Top-1 accuracy in [0, 1]."""
    return float((logits.argmax(-1) == labels).float().mean())


def dir_bytes(path: str, names: tuple[str, ...] = ("adapter_model.safetensors", "thrifty_head.safetensors")) -> int:
    """Bytes on disk of the named files in `path` (the saved adapter: adapter weights, and the head where a PEFT-native
    LoRA directory keeps it in its own file, see thrifty.tuners.peft_format)."""
    import os

    return sum(os.path.getsize(os.path.join(path, n)) for n in names if os.path.isfile(os.path.join(path, n)))


__all__ = [
    "accuracy",
    "cpu_peak_growth",
    "dir_bytes",
    "environment",
    "saved_activation_bytes",
    "training_step",
]
