"""What a backbone expects as input: an image transform or a tokenizer, applied by the data path."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ImagePreprocess:
    """Direct resize to `size` (the PETL/VTAB convention: no crop), then (x - mean) / std per channel.

    `mean`/`std` come from the model's pretrained config (timm) or its packaging (EfficientNet-Lite: 0.5/0.5).
    """

    size: tuple[int, int]
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    interpolation: str = "bicubic"
    channels: int = 3

    kind = "image"

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "image",
            "size": list(self.size),
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
        }

    def from_uint8(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(B, H, W) or (B, H, W, C) uint8 -> (B, C, *size) float, normalized; grey images are repeated to C."""
        x = torch.tensor(np.asarray(images))  # copy: source arrays may be read-only
        if x.ndim == 3:
            x = x.unsqueeze(-1)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)  # (B, C, H, W)
        return self.from_float(x)

    def from_float(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) floats in [0, 1] -> (B, channels, *size) normalized."""
        if x.shape[1] == 1 and self.channels != 1:
            x = x.expand(-1, self.channels, -1, -1)
        if tuple(x.shape[-2:]) != tuple(self.size):
            mode = "bicubic" if self.interpolation == "bicubic" else "bilinear"
            x = F.interpolate(x, size=self.size, mode=mode, align_corners=False, antialias=True).clamp_(0, 1)
        mean = torch.tensor(self.mean, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(1, -1, 1, 1)
        return (x - mean) / std

    def from_pil(self, image: Any) -> torch.Tensor:
        """One PIL image -> (C, *size)."""
        arr = np.asarray(image.convert("RGB" if self.channels == 3 else "L"))
        return self.from_uint8(arr[None])[0]

    def random_inputs(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(batch_size, self.channels, *self.size, generator=generator)


@dataclass(frozen=True)
class TextPreprocess:
    """Tokenize to a fixed `max_length` (padding + truncation) with the backbone's own tokenizer."""

    tokenizer: Any = field(repr=False)
    max_length: int = 128

    kind = "text"

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "text",
            "tokenizer": getattr(self.tokenizer, "name_or_path", "?"),
            "max_length": self.max_length,
        }

    def with_max_length(self, max_length: int) -> TextPreprocess:
        return TextPreprocess(self.tokenizer, max_length)

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            list(texts), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def random_inputs(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        vocab = int(getattr(self.tokenizer, "vocab_size", 1000))
        ids = torch.randint(1000 if vocab > 2000 else 1, vocab, (batch_size, self.max_length), generator=generator)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@dataclass(frozen=True)
class TablePreprocess:
    """Rows of a categorical table as `{field: (B,) int64 ids}`; id 0 is the unseen/missing value of every field.
    The dataset encodes the rows (vocabularies fit on the training split, thrifty.data.tables); `fields` holds
    (name, vocabulary size incl. id 0) once the backbone is fit to a task."""

    fields: tuple[tuple[str, int], ...] = ()

    kind = "table"

    def describe(self) -> dict[str, Any]:
        return {"kind": "table", "fields": {name: size for name, size in self.fields}}

    def random_inputs(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        return {name: torch.randint(0, size, (batch_size,), generator=generator) for name, size in self.fields}
