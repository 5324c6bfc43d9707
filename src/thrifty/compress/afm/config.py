"""`AFMConfig`: low-rank compression by feature mimicking (compression.md §5; docs/methods.md, "AFM").

Exactly one rank rule: `rank` (every targeted layer), `energy` (per layer: the smallest rank whose eigenvalues
keep this fraction of the output variance), `budget` (the targets keep this fraction of their parameters) or
`size_ratio` (the whole model ends this many times smaller); the two global rules split the budget by
`allocation` (a common energy threshold, or the output distortion each layer causes on the proxy set). With none
given, `energy=0.99`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from thrifty.values import check


INITS = ("afm", "svd_w", "scratch")
FINETUNES = ("none", "labels", "mimic")
ALLOCATIONS = ("energy", "sensitivity")
FORMAT_VERSION = 1


@dataclass
class AFMConfig:
    """Options of the `afm` compressor (`compress_(model, AFMConfig(...), calib)`; `thrifty compress --method afm`).

    `init`: `afm` factorizes the output features (PCA of Cov(y) on the proxy set, the closed form of the paper),
    `svd_w` the weights (the baseline), `scratch` builds the same compressed architecture with random weights and
    trains it with labels (the "small model trained from scratch" baseline; needs `finetune="labels"`).
    `finetune` after factorization (the paper's recipe: NOT FOUND): `labels` = the model's objective on the
    calibration batches' labels; `mimic` = MSE between the compressed and the original model's features, no labels
    (global feature mimicking). AdamW, `finetune_epochs` passes over the calibration batches, constant lr.
    """

    method: ClassVar[str] = "afm"
    cli_flags: ClassVar[tuple[str, ...]] = ("rank", "energy", "budget", "size_ratio", "init", "act", "finetune")

    rank: int | None = field(default=None, metadata={"help": "rank of every targeted linear layer"})
    energy: float | None = field(default=None, metadata={"help": "per layer: keep this fraction of output variance"})
    budget: float | None = field(default=None, metadata={"help": "the targets keep this fraction of their params"})
    size_ratio: float | None = field(default=None, metadata={"help": "the whole model ends this many times smaller"})
    allocation: str = field(default="energy", metadata={"help": "global rules: energy | sensitivity"})
    embeddings: bool = field(default=True, metadata={"help": "also factorize per-field embedding tables (CTR)"})
    embed_rank: int | None = field(default=None, metadata={"help": "with `rank`: rank of every field table"})
    merge: bool = field(default=True, metadata={"help": "merge table projections into the MLP's first layer"})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "PEFT rules relative to the upstream model (default: the backbone's)"}
    )
    init: str = field(default="afm", metadata={"help": "afm | svd_w | scratch"})
    act: bool = field(default=False, metadata={"help": "`_act` variant: ReLU between the two factors"})
    finetune: str = field(default="none", metadata={"help": "none | labels | mimic"})
    finetune_epochs: int = 1
    finetune_lr: float = 1e-4
    finetune_batch_size: int | None = field(default=None, metadata={"help": "re-batch the proxy set (None: as given)"})
    calib_samples: int | None = field(default=None, metadata={"help": "at most this many proxy samples (None: all)"})
    sensitivity_samples: int = field(default=256, metadata={"help": "proxy samples that score sensitivity"})
    step: str = "prepare"
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        rules = [k for k in ("rank", "energy", "budget", "size_ratio") if getattr(self, k) is not None]
        check(len(rules) <= 1, f"give one rank rule (rank, energy, budget or size_ratio), got {rules}")
        if not rules:
            self.energy = 0.99
        check(self.rank is None or self.rank >= 1, f"`rank` must be >= 1, got {self.rank!r}")
        check(self.embed_rank is None or self.embed_rank >= 1, f"`embed_rank` must be >= 1, got {self.embed_rank!r}")
        check(self.energy is None or 0.0 < self.energy <= 1.0, f"`energy` must lie in (0, 1], got {self.energy!r}")
        check(self.budget is None or 0.0 < self.budget < 1.0, f"`budget` must lie in (0, 1), got {self.budget!r}")
        check(self.size_ratio is None or self.size_ratio > 1.0, f"`size_ratio` must be > 1, got {self.size_ratio!r}")
        check(self.allocation in ALLOCATIONS, f"`allocation` must be one of {ALLOCATIONS}, got {self.allocation!r}")
        check(self.init in INITS, f"`init` must be one of {INITS}, got {self.init!r}")
        check(self.finetune in FINETUNES, f"`finetune` must be one of {FINETUNES}, got {self.finetune!r}")
        check(
            self.init != "scratch" or self.finetune == "labels",
            "init='scratch' trains the compressed architecture from random weights: set finetune='labels'",
        )
        check(self.finetune_epochs >= 1, f"`finetune_epochs` must be >= 1, got {self.finetune_epochs!r}")
        check(self.finetune_lr > 0, f"`finetune_lr` must be positive, got {self.finetune_lr!r}")
        check(self.calib_samples is None or self.calib_samples >= 1, "`calib_samples` must be >= 1 (or None)")
        check(self.sensitivity_samples >= 1, "`sensitivity_samples` must be >= 1")
        check(self.finetune_batch_size is None or self.finetune_batch_size >= 1, "`finetune_batch_size` must be >= 1")
        check(self.version == FORMAT_VERSION, f"AFMConfig version {self.version} is not supported")

    @property
    def global_rule(self) -> bool:
        return self.budget is not None or self.size_ratio is not None

    def replace(self, **changes: Any) -> AFMConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "method": self.method}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AFMConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
