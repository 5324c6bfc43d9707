"""Option values typed on the command line: `coerce` a string to a dataclass field's type hint, and `check` for
validation in `__post_init__` (a typed ConfigError, never `assert`). Used by every config class."""

from __future__ import annotations

import types
import typing
from typing import Any

from thrifty.errors import ConfigError


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
