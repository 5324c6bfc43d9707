from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from thrifty.tuners.config import TunerConfig, check


@dataclass
class LoraConfig(TunerConfig):
    """LoRA (Hu et al. 2021) with PEFT's semantics: W x + (alpha / r) * B A dropout(x), B = 0 at init.

    `target_modules=None` takes the backbone's default (timm ViT: the fused `qkv`; BERT: `query`, `value`).
    """

    method: ClassVar[str] = "lora"
    aliases: ClassVar[dict[str, str]] = {"alpha": "lora_alpha", "dropout": "lora_dropout"}

    r: int = field(default=8, metadata={"help": "Rank of the update."})
    lora_alpha: float = field(default=8.0, metadata={"help": "Scaling numerator: the update is scaled by alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA branch input."})
    target_modules: list[str] | str | None = field(default=None, metadata={"help": "PEFT rules; see targeting.py."})
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | None = None
    layers_pattern: str | None = None

    def __post_init__(self) -> None:
        check(isinstance(self.r, int) and self.r > 0, f"`r` must be a positive integer, got {self.r!r}")
        check(0.0 <= self.lora_dropout < 1.0, f"`lora_dropout` must be in [0, 1), got {self.lora_dropout!r}")
        check(self.lora_alpha > 0, f"`lora_alpha` must be positive, got {self.lora_alpha!r}")
