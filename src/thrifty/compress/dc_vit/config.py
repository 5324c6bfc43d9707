"""`DCViTConfig`: DC-ViT (Zhang et al., CVPR 2024; ../shared/specs/compression.md §3) as one validated dataclass.

Reference values (the official run scripts, spec §3.3): `samples=50`, AdamW lr 3e-5, weight decay 1e-4, cosine
over `epochs=2000` (one step per epoch: 50 images, batch 64), loss scaled by min(epoch / 20, 1), random MLP subset
(`mlp_init="rand_sample"`), candidates = every block but the first and the last, final LayerNorm trainable.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from thrifty.values import check


VARIANTS = ("dc_vit", "block_drop")
MLP_INITS = ("rand_sample", "gelu_positive")
RANK_METRICS = ("kl", "mse")
MAC_CONVENTIONS = ("torch", "thop")
AUGMENTS = ("none", "flip")


@dataclass
class DCViTConfig:
    """Few-shot dense compression of a ViT-style backbone to `keep_macs` of its MACs.

    `variant="dc_vit"` removes the attention branch of `n` blocks and keeps `int(D * r)` of their MLP units (spec
    §3.2); `variant="block_drop"` is the baseline that removes whole blocks (the same ranking and recovery, the
    number of blocks whose MACs are nearest the budget). Labels are never read.
    """

    method: ClassVar[str] = "dc_vit"
    cli_flags: ClassVar[tuple[str, ...]] = ("keep_macs", "samples")

    keep_macs: float = field(default=0.75, metadata={"help": "fraction of the model's MACs to keep, in (0, 1)"})
    samples: int = field(default=50, metadata={"help": "few-shot training samples (labels are never read)"})
    metric_samples: int = field(
        default=50, metadata={"help": "held-apart samples on which block recoverability is measured"}
    )
    variant: str = field(default="dc_vit", metadata={"help": "dc_vit | block_drop (baseline: drop whole blocks)"})
    num_blocks: int | None = field(
        default=None, metadata={"help": "blocks to modify (reference --rm-num); default ceil(R / (M_a + M_m))"}
    )
    candidates: list[int] | None = field(
        default=None, metadata={"help": "blocks that may be modified; default all but the first and the last"}
    )
    mlp_init: str = field(
        default="rand_sample", metadata={"help": "rand_sample (reference) | gelu_positive (our statistic)"}
    )
    epochs: int = field(default=2000, metadata={"help": "recovery epochs per progressive step (reference 2000)"})
    rank_epochs: int | None = field(
        default=None, metadata={"help": "recovery epochs per ranked candidate (default: epochs)"}
    )
    lr: float = field(default=3e-5, metadata={"help": "AdamW learning rate (reference 3e-5)"})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay (reference 1e-4)"})
    warmup_epochs: int = field(default=20, metadata={"help": "loss scaled by min(epoch / warmup_epochs, 1)"})
    batch_size: int = field(default=64, metadata={"help": "recovery batch size (reference 64)"})
    train_norm: bool = field(
        default=True, metadata={"help": "the final norm trains with the prefix (the reference leaves it trainable)"}
    )
    rank_metric: str = field(
        default="kl", metadata={"help": "kl (teacher vs student logits, reference) | mse (final-norm tokens)"}
    )
    macs: str = field(
        default="torch",
        metadata={"help": "torch (every matmul, attention scores included) | thop (the reference's counting)"},
    )
    augment: str = field(default="none", metadata={"help": "none | flip (random horizontal flip of images)"})
    seed: int = field(default=0, metadata={"help": "seed of the MLP subsets and the batch order"})
    version: int = 1

    def __post_init__(self) -> None:
        check(
            isinstance(self.keep_macs, (int, float)) and 0.0 < float(self.keep_macs) < 1.0,
            f"`keep_macs` must lie in (0, 1) (the fraction of MACs kept), got {self.keep_macs!r}; "
            "keep_macs >= 1 removes nothing",
        )
        check(int(self.samples) > 0, f"`samples` must be positive, got {self.samples!r}")
        check(int(self.metric_samples) > 0, f"`metric_samples` must be positive, got {self.metric_samples!r}")
        check(self.variant in VARIANTS, f"`variant` must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        check(self.mlp_init in MLP_INITS, f"`mlp_init` must be one of {', '.join(MLP_INITS)}, got {self.mlp_init!r}")
        check(
            self.rank_metric in RANK_METRICS,
            f"`rank_metric` must be one of {', '.join(RANK_METRICS)}, got {self.rank_metric!r}",
        )
        check(self.macs in MAC_CONVENTIONS, f"`macs` must be one of {', '.join(MAC_CONVENTIONS)}, got {self.macs!r}")
        check(self.augment in AUGMENTS, f"`augment` must be one of {', '.join(AUGMENTS)}, got {self.augment!r}")
        check(self.num_blocks is None or int(self.num_blocks) > 0, f"`num_blocks` must be positive: {self.num_blocks}")
        check(int(self.epochs) >= 0, f"`epochs` must be >= 0 (0: recover nothing), got {self.epochs!r}")
        check(
            self.rank_epochs is None or int(self.rank_epochs) >= 0,
            f"`rank_epochs` must be >= 0, got {self.rank_epochs!r}",
        )
        check(self.lr > 0, f"`lr` must be positive, got {self.lr!r}")
        check(self.weight_decay >= 0, f"`weight_decay` must be >= 0, got {self.weight_decay!r}")
        check(int(self.warmup_epochs) >= 0, f"`warmup_epochs` must be >= 0, got {self.warmup_epochs!r}")
        check(int(self.batch_size) > 0, f"`batch_size` must be positive, got {self.batch_size!r}")
        if self.candidates is not None:
            check(len(self.candidates) > 0, "`candidates` must name at least one block (or be None)")
            check(
                len(set(self.candidates)) == len(self.candidates),
                f"`candidates` lists a block twice: {self.candidates}",
            )
            self.candidates = [int(c) for c in self.candidates]

    @property
    def ranking_epochs(self) -> int:
        return self.epochs if self.rank_epochs is None else int(self.rank_epochs)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "method": self.method}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DCViTConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
