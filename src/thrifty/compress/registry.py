"""Compressor registry (torchao style): one registration per config class, keyed by `config_cls.method`.

    register_compressor(QwTV2Config, apply=..., save=save_quantized, load=load_quantized, ...)
    compress_(model, QwTV2Config(base_config=PTQConfig(w_bits=4)), calib_batches)   # in place, returns None
    model, info = load_compressed("out/")                    # whichever compressor wrote out/
    make_compressor_config("qwt_v2", {"bits": "w4a8", "ridge": "0.1"})               # CLI strings -> config

The name is the config class's `method` ClassVar: there is no second string to keep in sync. A module or package
under `thrifty.compress` registers its compressors when imported, and every public one is imported on first use of
the registry, so a new compressor lands as one registration (plus its tiny case in tests/test_compress_contract.py).
Compressors outside thrifty call `register_compressor` themselves.

What a registration provides (`Compressor` fields):
- `apply(model, config, calib, *, filter_fn=None, **kwargs) -> None`: the in-place rewrite; `calib` is an iterable
  of batches or None (thrifty.compress.calibration.protocol_handler builds it from prepare / convert steps);
- `save(model, directory, *, backbone=None, extra=None)` (`backbone`: a BackboneSpec naming the architecture to
  record, default the spec the model's backbone was loaded with) and
  `load(directory, device="cpu") -> (model, info)`; `load` raises CheckpointError on a foreign or corrupt folder;
- `manifest` / `config_key`: the JSON file `save` writes and its key holding `config_dict(config)` (with "method");
- `options` / `make_config`: the options `make_compressor_config` accepts (name -> type hint; default: the
  config's dataclass fields except `step` and `version`) and how typed options become a config (default
  `config_cls(**options)`); `option_help` documents options that are not config fields;
- `config_cls.cli_flags` (ClassVar tuple of option names): options `thrifty compress` exposes as their own flags;
- optional `export_onnx(model, path, example_inputs) -> path` and `summarize(model) -> dict` (results.json);
  `onnx_options`: option defaults for models compressed to be exported (`thrifty compress --onnx`), applied where
  the user set no value; `onnx_model_options(model, config) -> dict`: more such defaults that depend on the
  loaded model (e.g. the QLinearConv form for CNNs);
- optional CLI inputs where the default (the fine-tuned classifier of --adapter, a seeded sample of the training
  split, test accuracy) does not fit: `cli_model(backbone, task, adapter) -> model`,
  `cli_calibration(task, n, batch_size, seed) -> batches`, `cli_evaluate(model, task) -> dict`.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import pkgutil
import re
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from thrifty.errors import CheckpointError, ConfigError
from thrifty.registry import Registry


DEFAULT_MANIFEST = "compress_config.json"
PROTOCOL_FIELDS = ("step", "version")  # config fields that are not user options


@dataclass(frozen=True)
class Compressor:
    """One registered compressor; see the module docstring for each field."""

    name: str
    config_cls: type
    apply: Callable[..., None]
    save: Callable[..., None]
    load: Callable[..., tuple[nn.Module, dict[str, Any]]]
    options: Mapping[str, Any]
    make_config: Callable[[dict[str, Any]], Any] | None = None
    option_help: Mapping[str, str] = field(default_factory=dict)
    manifest: str = DEFAULT_MANIFEST
    config_key: str = "config"
    export_onnx: Callable[[nn.Module, str, Any], str] | None = None
    onnx_options: Mapping[str, Any] = field(default_factory=dict)
    onnx_model_options: Callable[[nn.Module, Any], dict[str, Any]] | None = None
    summarize: Callable[[nn.Module], dict[str, Any]] | None = None
    cli_model: Callable[..., nn.Module] | None = None
    cli_calibration: Callable[..., Iterable[Any]] | None = None
    cli_evaluate: Callable[..., dict[str, Any]] | None = None

    def build_config(self, options: dict[str, Any]) -> Any:
        """Typed options -> config (`make_config`, default `config_cls(**options)`)."""
        return self.make_config(options) if self.make_config else self.config_cls(**options)

    @property
    def cli_flags(self) -> tuple[str, ...]:
        return tuple(getattr(self.config_cls, "cli_flags", ()))

    def help_of(self, option: str) -> str:
        """Help text of an option: the config field's `metadata["help"]`, else `option_help`."""
        for f in dataclasses.fields(self.config_cls):
            if f.name == option and "help" in f.metadata:
                return str(f.metadata["help"])
        return self.option_help.get(option, "")


def _import_compressors() -> None:
    """Import every public module and package under thrifty.compress: each registers its compressors."""
    import thrifty.compress as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{pkg.__name__}.{info.name}")


COMPRESSORS: Registry[Compressor] = Registry("compressor", builtins=_import_compressors)
_BY_CONFIG: dict[type, Compressor] = {}


def default_options(config_cls: type) -> dict[str, Any]:
    """Option name -> type hint: the config's init fields except `step` and `version`."""
    hints = typing.get_type_hints(config_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(config_cls) if f.init and f.name not in PROTOCOL_FIELDS}


def register_compressor(
    config_cls: type,
    *,
    apply: Callable[..., None],
    save: Callable[..., None],
    load: Callable[..., tuple[nn.Module, dict[str, Any]]],
    options: Mapping[str, Any] | None = None,
    make_config: Callable[[dict[str, Any]], Any] | None = None,
    **extra: Any,
) -> Compressor:
    """Register the compressor of `config_cls` under `config_cls.method`; returns the entry.

    Registering the same entry again is a no-op; another entry under a taken name raises ConfigError.
    `extra` are the optional `Compressor` fields (option_help, manifest, config_key, export_onnx, onnx_options,
    onnx_model_options, summarize, cli_model, cli_calibration, cli_evaluate).
    """
    name = getattr(config_cls, "method", "")
    if not dataclasses.is_dataclass(config_cls) or not isinstance(config_cls, type):
        raise ConfigError(f"register_compressor takes a dataclass config class, got {config_cls!r}")
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ConfigError(
            f"{config_cls.__name__}.method must be a lower-case name (the compressor's registry key), got {name!r}"
        )
    known = {f.name for f in dataclasses.fields(Compressor)}
    unknown = set(extra) - known
    if unknown:
        raise ConfigError(f"register_compressor: unknown field(s) {sorted(unknown)}; fields: {sorted(known)}")
    entry = Compressor(
        name=name,
        config_cls=config_cls,
        apply=apply,
        save=save,
        load=load,
        options=dict(default_options(config_cls) if options is None else options),
        make_config=make_config,
        **extra,
    )
    if name in COMPRESSORS and COMPRESSORS.get(name) != entry:
        raise ConfigError(
            f"compressor {name!r} is already registered (by {COMPRESSORS.get(name).config_cls.__name__}); "
            "give the new config class another `method` name, or unregister_compressor() first"
        )
    missing = [f for f in entry.cli_flags if f not in entry.options]
    if missing:
        raise ConfigError(f"{config_cls.__name__}.cli_flags {missing} are not options of {name!r}")
    entry = COMPRESSORS.register(name, entry)
    _BY_CONFIG[config_cls] = entry
    return entry


def unregister_compressor(name: str) -> None:
    """Remove a registration (tests and plugins)."""
    if name not in COMPRESSORS:
        raise ConfigError(f"no compressor {name!r} is registered")
    entry = COMPRESSORS.get(name)
    COMPRESSORS.unregister(name)
    _BY_CONFIG.pop(entry.config_cls, None)


def available_compressors() -> list[str]:
    return COMPRESSORS.names()


def _listing() -> str:
    return ", ".join(f"{n} ({e.config_cls.__name__})" for n, e in COMPRESSORS.entries().items()) or "none"


def get_compressor(name: str) -> Compressor:
    if name not in COMPRESSORS:
        raise ConfigError(f"unknown compressor {name!r}; registered: {_listing()}")
    return COMPRESSORS.get(name)


def compressor_for(config: Any) -> Compressor:
    """The entry of `type(config)` (exact type, as torchao's handler table)."""
    COMPRESSORS.names()  # built-ins registered
    entry = _BY_CONFIG.get(type(config))
    if entry is None:
        raise ConfigError(
            f"no compressor is registered for {type(config).__name__}; registered: {_listing()} "
            "(build a config with thrifty.compress.make_compressor_config, or register_compressor a new one)"
        )
    return entry


def compress_(
    model: nn.Module, config: Any, calib: Iterable[Any] | None = None, *, filter_fn=None, **kwargs: Any
) -> None:
    """Compress `model` in place with the compressor registered for `type(config)`; returns None.

    Args:
        calib: calibration batches (inputs, or (inputs, labels) pairs) for data-driven compressors.
        filter_fn: torchao-style `filter_fn(module, fqn) -> bool` restricting which modules are rewritten.
        kwargs: passed to the handler (e.g. the quantizers' `spec` for step="prepare_for_loading").
    """
    compressor_for(config).apply(model, config, calib, filter_fn=filter_fn, **kwargs)


def coerce_options(name: str, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """`--set key=value` strings -> typed options of compressor `name`; an unknown key raises ConfigError."""
    from thrifty.tuners.config import coerce

    entry = get_compressor(name)
    typed = {}
    for key, value in (overrides or {}).items():
        option = key.replace("-", "_")
        if option not in entry.options:
            raise ConfigError(
                f"compressor {name!r} has no option `{key}`; options: {', '.join(sorted(entry.options))}"
            )
        typed[option] = coerce(value, entry.options[option], option)
    return typed


def make_compressor_config(name: str, overrides: Mapping[str, Any] | None = None) -> Any:
    """Config of compressor `name` from `--set key=value` style options (strings coerced to the option types)."""
    return get_compressor(name).build_config(coerce_options(name, overrides))


def config_dict(config: Any) -> dict[str, Any]:
    """`config.to_dict()`, or the dataclass fields plus "method"; what a manifest records under its config key."""
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return {**dataclasses.asdict(config), "method": type(config).method}


def saved_method(directory: str) -> str:
    """The compressor that wrote `directory`, read from the manifests of the registered compressors."""
    from thrifty.io import read_json

    registered = COMPRESSORS.entries()
    manifests = sorted({(e.manifest, e.config_key) for e in registered.values()})
    for manifest, key in manifests:
        path = os.path.join(directory, manifest)
        if os.path.isfile(path):
            data = read_json(path)
            method = data.get(key, {}).get("method") if isinstance(data, dict) else None
            entry = registered.get(method) if isinstance(method, str) else None
            if entry is not None and (entry.manifest, entry.config_key) == (manifest, key):
                return method
    names = ", ".join(sorted({m for m, _ in manifests}))
    raise CheckpointError(
        f"{directory} holds no model of a registered compressor (looked for {names}); registered: {_listing()}"
    )


def load_compressed(directory: str, device: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Load a compressed model with the loader of whichever registered compressor saved it."""
    return get_compressor(saved_method(directory)).load(directory, device)
