"""Tuners: one folder per method, registered by name; `get_tuned_model` wraps a backbone with a method.

LoRA directories are stock peft's layout both ways (`peft_format`): `PeftModel.from_pretrained` loads them on the
upstream model (timm: head as `modules_to_save`; Hugging Face encoders: head in thrifty_head.safetensors, since
thrifty's mean pooling has no transformers class), and `load_tuned_model` loads peft's LoRA directories."""

from thrifty.tuners.base import CONFIG_NAME, WEIGHTS_NAME, TunedModel
from thrifty.tuners.config import TunerConfig
from thrifty.tuners.registry import available_methods, get_method, get_tuned_model, make_config, register_method


def load_tuned_model(backbone, directory: str, is_trainable: bool = False) -> TunedModel:
    """Load a saved adapter directory onto `backbone` (see TunedModel.from_pretrained)."""
    return TunedModel.from_pretrained(backbone, directory, is_trainable=is_trainable)


__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "TunedModel",
    "TunerConfig",
    "available_methods",
    "get_method",
    "get_tuned_model",
    "load_tuned_model",
    "make_config",
    "register_method",
]
