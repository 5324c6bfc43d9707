"""Backbone kinds, timm-style: `@register_backbone(name, takes_argument=...)` on a loader
`fn(spec: BackboneSpec) -> Backbone`; `load_backbone` resolves any spec through this one table."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from thrifty.backbones.spec import BackboneSpec
from thrifty.errors import SpecError
from thrifty.registry import Registry


@dataclass(frozen=True)
class BackboneKind:
    name: str
    loader: Callable[[BackboneSpec], object]
    takes_argument: bool  # `name:<argument>` (a model name, a path, a URL) or the bare name
    help: str
    aliases: tuple[str, ...] = ()


BACKBONES: Registry[BackboneKind] = Registry("backbone", builtins="thrifty.backbones.builtin")


def register_backbone(
    name: str, *, takes_argument: bool = False, help: str = "", aliases: tuple[str, ...] = ()
) -> Callable[[Callable[[BackboneSpec], object]], Callable[[BackboneSpec], object]]:
    """Decorator: register `loader(spec) -> Backbone` as backbone kind `name` (and its aliases)."""

    def wrap(loader: Callable[[BackboneSpec], object]) -> Callable[[BackboneSpec], object]:
        kind = BackboneKind(name, loader, takes_argument, help or (loader.__doc__ or "").strip(), aliases)
        for key in (name, *aliases):
            BACKBONES.register(key, kind)
        return loader

    return wrap


def available_backbones() -> list[str]:
    """Registered kinds (aliases left out); `timm:<name>`-style kinds take an argument."""
    return sorted({BACKBONES.get(n).name for n in BACKBONES.names()})


def backbone_kind(spec: BackboneSpec) -> BackboneKind:
    if spec.kind not in BACKBONES:
        usage = ", ".join(f"{k}:<...>" if BACKBONES.get(k).takes_argument else k for k in available_backbones())
        raise SpecError(f"unknown backbone spec {spec.name!r}; use one of: {usage}")
    kind = BACKBONES.get(spec.kind)
    if kind.takes_argument and not spec.argument:
        raise SpecError(f"backbone kind {kind.name!r} needs an argument: {kind.name}:<...> ({kind.help})")
    if not kind.takes_argument and spec.argument is not None:
        raise SpecError(f"backbone {kind.name!r} takes no argument; got {spec.name!r}")
    return kind
