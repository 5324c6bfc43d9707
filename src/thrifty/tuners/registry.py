"""Method registry: `register_method(name, config_cls, model_cls)`; `get_tuned_model(backbone, config, C)`."""

from __future__ import annotations

from typing import Any

from thrifty.errors import ConfigError


_REGISTRY: dict[str, tuple[type, type]] = {}


def register_method(name: str, config_cls: type, model_cls: type) -> None:
    if name in _REGISTRY and _REGISTRY[name] != (config_cls, model_cls):
        raise ConfigError(f"method {name!r} is already registered")
    _REGISTRY[name] = (config_cls, model_cls)


def get_method(name: str) -> tuple[type, type]:
    _load_builtin()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(available_methods())}")
    return _REGISTRY[name]


def available_methods() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def make_config(name: str, overrides: dict[str, Any] | None = None):
    """Config of method `name` from `--set` style overrides (strings coerced to field types)."""
    config_cls, _ = get_method(name)
    return config_cls.from_overrides(overrides or {})


def get_tuned_model(backbone, config, num_classes: int):
    """PEFT's `get_peft_model`: wrap `backbone` with the method of `config` and a fresh head."""
    _, model_cls = get_method(config.method)
    return model_cls(backbone, config, num_classes)


def _load_builtin() -> None:
    import thrifty.tuners.methods  # noqa: F401  (registers the built-in methods)
