from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from thrifty.tuners.config import TunerConfig, check


GATHERS = ("sum",)
POOLS = ("mean", "token")


@dataclass
class MietConfig(TunerConfig):
    """MIET, Minimal Interaction Edge Tuning (Tang, Fu & Wu, arXiv 2406.17559, renamed MIST in v3; no public
    code, see docs/methods.md): a small low-rank-attention edge network trained on ONE gathered feature map.

        g = Gather*(B, x, k) = z_first + ... + z_k        z_0 = embedding output, z_i = output of block i (1-based)
        y = LSA_depth(... LSA_1(g))                       LSA = LAST's low-rank self-attention block (up zero-init)
        logits = head(LN(pool(y)))                        LN: the edge network's own (trainable) LayerNorm
    With the up-projections zero at init, MIET starts as a linear probe on LN(pool(g)).
    """

    method: ClassVar[str] = "miet"
    aliases: ClassVar[dict[str, str]] = {"rank": "r", "num_heads": "heads", "layers": "depth"}

    k: int | None = field(
        default=None,
        metadata={"help": "Last index summed, 0 <= k <= L (z_0..z_L); negative counts from L (-1 = L); None = L."},
    )
    first: int = field(default=0, metadata={"help": "First index summed: 0 includes the embedding output z_0."})
    gather: str = field(default="sum", metadata={"help": "Gather function: `sum` (MIET's Gather*)."})
    depth: int = field(default=2, metadata={"help": "Number of LSA blocks in the edge network."})
    r: int = field(default=16, metadata={"help": "Rank r: Q/K/V width of every LSA block (r << D)."})
    heads: int = field(default=1, metadata={"help": "Attention heads inside the r-dimensional space."})
    pool: str = field(default="mean", metadata={"help": "`mean` of patch / real tokens, or `token` (CLS)."})
    bias: bool = field(default=True, metadata={"help": "Biases in the Q/K/V and up projections."})

    def __post_init__(self) -> None:
        check(self.k is None or isinstance(self.k, int), f"`k` must be an integer or None, got {self.k!r}")
        check(isinstance(self.first, int) and self.first >= 0, f"`first` must be >= 0, got {self.first!r}")
        check(self.gather in GATHERS, f"`gather` must be one of {GATHERS}, got {self.gather!r}")
        check(isinstance(self.depth, int) and self.depth >= 0, f"`depth` must be >= 0, got {self.depth!r}")
        check(isinstance(self.r, int) and self.r > 0, f"`r` must be a positive integer, got {self.r!r}")
        check(
            isinstance(self.heads, int) and self.heads > 0 and self.r % self.heads == 0,
            f"`heads` must be a positive divisor of `r` ({self.r}), got {self.heads!r}",
        )
        check(self.pool in POOLS, f"`pool` must be one of {POOLS}, got {self.pool!r}")
