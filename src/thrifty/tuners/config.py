"""Method configs: `XxxConfig` dataclasses that validate in `__post_init__` and round-trip through
`adapter_config.json` (PEFT style: flat, sorted keys, every field present)."""

from __future__ import annotations

import dataclasses
import types
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

from thrifty.errors import ConfigError


FORMAT_VERSION = 1


@dataclass
class TunerConfig:
    """Base of every method config. `method` is the registry name (PEFT's `peft_type`)."""

    method: ClassVar[str] = ""
    aliases: ClassVar[dict[str, str]] = {}

    inference_mode: bool = field(default=False, metadata={"help": "True in saved configs (PEFT convention)."})

    def to_dict(self) -> dict[str, Any]:
        from thrifty import __version__

        d = dataclasses.asdict(self)
        d.update(method=self.method, thrifty_version=__version__, format_version=FORMAT_VERSION)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TunerConfig:
        """Build from a dict; unknown keys (e.g. from a newer version) warn instead of failing."""
        names = {f.name for f in dataclasses.fields(cls)}
        known = {}
        for k, v in d.items():
            k = cls.aliases.get(k, k)
            if k in names:
                known[k] = v
            elif k not in ("method", "thrifty_version", "format_version"):
                warnings.warn(f"{cls.__name__}: ignoring unknown key {k!r}", stacklevel=2)
        return cls(**known)

    @classmethod
    def from_overrides(cls, overrides: dict[str, Any]) -> TunerConfig:
        """Build from `--set key=value` strings, coercing each value to the field's type."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, value in overrides.items():
            name = cls.aliases.get(key, key)
            if name not in fields:
                raise ConfigError(f"{cls.__name__} has no option `{key}`; options: {', '.join(sorted(fields))}")
            kwargs[name] = coerce(value, hints[name], key)
        return cls(**kwargs)


def coerce(value: Any, hint: Any, key: str) -> Any:
    """Coerce a CLI string to a type hint (bool, int, float, str, list[str], list[int], Optional)."""
    if not isinstance(value, str):
        return value
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value.lower() in ("none", "null", ""):
            return None
        for a in args:
            try:
                return coerce(value, a, key)
            except ConfigError:
                continue
        raise ConfigError(f"`{key}`: cannot parse {value!r} as {hint}")
    if origin in (list, tuple):
        (inner,) = typing.get_args(hint)[:1] or (str,)
        items = [v.strip() for v in value.strip("[]").split(",") if v.strip()]
        return [coerce(v, inner, key) for v in items]
    try:
        if hint is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if hint in (int, float, str):
            return hint(value)
    except ValueError:
        raise ConfigError(f"`{key}`: {value!r} is not a valid {getattr(hint, '__name__', hint)}") from None
    return value


def check(condition: bool, message: str) -> None:
    """Validation helper for `__post_init__` (never `assert` for user input)."""
    if not condition:
        raise ConfigError(message)
