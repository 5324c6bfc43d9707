"""`TrainConfig`: the training recipe (one dataclass for the CLI, the demo, the benchmark harness and Python)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from thrifty.errors import ConfigError
from thrifty.runtime import MALLOC_MODES, tune_malloc
from thrifty.train.optim import OPTIMIZERS


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 32  # global batch: split across torchrun ranks
    lr: float | None = None  # None: the method's default (TunerConfig.default_lr: 1e-3; full 1e-4)
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    min_lr: float = 1e-6
    grad_clip: float | None = 1.0
    optimizer: str = "adamw"  # adamw | sgd (momentum 0.9)
    label_smoothing: float = 0.0  # classification objectives only
    seed: int = 0
    amp: bool = True  # CUDA only (bf16 autocast); ignored on CPU
    device: str = "auto"
    eval_batch_size: int | None = None
    num_workers: int = 0
    select_on_val: bool = False  # train on the tuning split, keep the best epoch on val, then test it
    progress: bool = True
    malloc: str = "tuned"  # CPU: keep freed large blocks for reuse (thrifty.runtime.allocator); "system": leave it
    flush_denormal: bool = True  # CPU: subnormal floats read as 0 on every thread during fit (runtime.denormals)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"`{name}` must be positive, got {getattr(self, name)!r}")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"`lr` must be positive, got {self.lr!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"`optimizer` must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.malloc not in MALLOC_MODES:
            raise ConfigError(f"`malloc` must be one of {MALLOC_MODES}, got {self.malloc!r}")

    @property
    def train_role(self) -> str:
        """The split role that trains: the tuning split when a checkpoint is selected on val."""
        return "tune_train" if self.select_on_val else "train"

    @property
    def eval_bs(self) -> int:
        """Evaluation batch size: `eval_batch_size`, else max(batch_size, 64)."""
        return self.eval_batch_size or max(self.batch_size, 64)


def apply_malloc(config: TrainConfig, device: torch.device) -> str:
    """`config.malloc` applied on CPU (thrifty.runtime.allocator); returns what is in effect ('system' on CUDA)."""
    return tune_malloc(config.malloc) if device.type == "cpu" else "system"
