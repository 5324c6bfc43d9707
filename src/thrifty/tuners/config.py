"""Method configs: `XxxConfig` dataclasses that validate in `__post_init__` and round-trip through
`adapter_config.json` (PEFT style: flat, sorted keys, every field present)."""

from __future__ import annotations

import dataclasses
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

from thrifty.errors import ConfigError
from thrifty.values import check, coerce


FORMAT_VERSION = 1


@dataclass
class TunerConfig:
    """Base of every method config. `method` is the registry name (PEFT's `peft_type`)."""

    method: ClassVar[str] = ""
    aliases: ClassVar[dict[str, str]] = {}
    default_lr: ClassVar[float] = 1e-3  # the learning rate a run uses when none is given (TrainConfig.lr = None)

    inference_mode: bool = field(default=False, metadata={"help": "True in saved configs (PEFT convention)."})

    def to_dict(self) -> dict[str, Any]:
        from thrifty.version import __version__

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


__all__ = ["FORMAT_VERSION", "TunerConfig", "check", "coerce"]
