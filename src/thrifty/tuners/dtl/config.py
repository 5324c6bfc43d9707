from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from thrifty.tuners.config import TunerConfig, check


@dataclass
class DTLConfig(TunerConfig):
    """DTL (Fu, Zhu & Wu, AAAI 2024; official code heekhero/DTL @ bf6c51e): a compact side network (CSN) of
    rank-`r` maps, one per block in `map_blocks`, reading each block's input; their running sum h goes through
    swish_beta(h) = h * sigmoid(beta * h) and is added to the output of every block from `add_from` on.

    Official defaults: r=2, beta=100, maps on all 12 blocks, additions after blocks 6..11 (`add_from` = L // 2).
    `kernel` > 0 adds DTL+'s one shared depthwise k x k conv over the patch grid (method `dtl_plus`).
    """

    method: ClassVar[str] = "dtl"
    aliases: ClassVar[dict[str, str]] = {
        "rank": "r",
        "lora_before_blocks": "map_blocks",
        "add_after_blocks": "add_from",
        "fusion_size": "kernel",
        "drop_path_rate": "drop_path",
    }

    r: int = field(default=2, metadata={"help": "Rank d' of every low-rank map (A: r x D, B: D x r)."})
    beta: float = field(default=100.0, metadata={"help": "Swish slope: s = h * sigmoid(beta * h)."})
    map_blocks: list[int] | None = field(
        default=None, metadata={"help": "Blocks whose input a low-rank map reads (None: all blocks)."}
    )
    add_from: int | None = field(
        default=None, metadata={"help": "M: the side signal is added after blocks M..L-1 (None: L // 2)."}
    )
    kernel: int = field(default=0, metadata={"help": "DTL+ depthwise conv kernel k (0: plain DTL)."})
    drop_path: float = field(
        default=0.0,
        metadata={"help": "Stochastic depth of the frozen timm blocks in training (linearly 0..rate over depth)."},
    )

    def __post_init__(self) -> None:
        check(isinstance(self.r, int) and self.r > 0, f"`r` must be a positive integer, got {self.r!r}")
        check(self.beta > 0, f"`beta` must be positive, got {self.beta!r}")
        check(
            isinstance(self.kernel, int) and self.kernel >= 0, f"`kernel` must be an integer >= 0, got {self.kernel!r}"
        )
        check(0.0 <= self.drop_path < 1.0, f"`drop_path` must be in [0, 1), got {self.drop_path!r}")
        check(
            self.add_from is None or (isinstance(self.add_from, int) and self.add_from >= 0),
            f"`add_from` must be a block index >= 0 or None, got {self.add_from!r}",
        )
        check(self.map_blocks is None or len(self.map_blocks) > 0, "`map_blocks` must name at least one block")


@dataclass
class DTLPlusConfig(DTLConfig):
    """DTL+: DTL plus one depthwise k x k conv (no bias, 'same' padding), shared by all addition points, applied
    to the side signal of the patch tokens (official per-task k in {3, 4, 5})."""

    method: ClassVar[str] = "dtl_plus"

    kernel: int = field(default=3, metadata={"help": "Depthwise conv kernel k (>= 1)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.kernel >= 1, f"`kernel` must be >= 1 for dtl_plus, got {self.kernel!r} (use method dtl)")
