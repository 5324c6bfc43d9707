"""`BackboneSpec`: which backbone to build and how, in one value (name, local checkpoint, random init, input
size), passed whole instead of four keywords through every signature; saved in results and quantized folders."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from thrifty.errors import SpecError


@dataclass(frozen=True)
class BackboneSpec:
    """`name`: a registered kind, with its argument after a colon (`timm:vit_base_patch16_224.orig_in21k`,
    `hf:PATH`, `minilm`, ...; `thrifty list backbones`). `checkpoint`: local weights. `random_init`: no weights
    (seeded). `image_size` / `max_length`: input resolution of image backbones, tokens of text backbones.
    `token_file`: the bearer token of a `remote:URL` feature server."""

    name: str
    checkpoint: str | None = None
    random_init: bool = False
    image_size: int | None = None
    max_length: int | None = None
    token_file: str | None = None  # `remote:URL` backbones: the feature server's bearer token

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise SpecError(f"a backbone spec needs a name, got {self.name!r}")
        for key in ("image_size", "max_length"):
            value = getattr(self, key)
            if value is not None and int(value) <= 0:
                raise SpecError(f"`{key}` must be positive, got {value!r}")

    @property
    def kind(self) -> str:
        """The registry key: the part before the first colon."""
        return self.name.split(":", 1)[0]

    @property
    def argument(self) -> str | None:
        """What follows `kind:` (a timm model name, a path, a URL), or None."""
        _, sep, rest = self.name.partition(":")
        return rest if sep else None

    @property
    def pretrained(self) -> bool | None:
        """None: the hub/packaged weights unless `checkpoint` is given; False: random init."""
        return False if self.random_init else None

    def replace(self, **changes: Any) -> BackboneSpec:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BackboneSpec:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def of(
        cls,
        spec: str | BackboneSpec,
        *,
        checkpoint: str | None = None,
        pretrained: bool | None = None,
        image_size: int | None = None,
        max_length: int | None = None,
    ) -> BackboneSpec:
        """A spec from a string plus keywords, or a spec with the given keywords filled in where it has none."""
        if isinstance(spec, BackboneSpec):
            given = {"checkpoint": checkpoint, "image_size": image_size, "max_length": max_length}
            changes = {k: v for k, v in given.items() if v is not None}
            if pretrained is False:
                changes["random_init"] = True
            return spec.replace(**changes) if changes else spec
        return cls(spec, checkpoint, pretrained is False, image_size, max_length)
