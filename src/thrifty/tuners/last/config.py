from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from thrifty.tuners.config import TunerConfig, check


LSA_INPUTS = ("sum", "corrected")
POOLS = ("mean", "token")


@dataclass
class LastConfig(TunerConfig):
    """LAST-like side network (Tang, Fu, Zhu & Wu, arXiv 2402.04009; no public code, see docs/methods.md):
    one low-rank self-attention block per tapped block output z_m of the frozen backbone.

    Side stream (d = sum of the LSA branch outputs so far, 0 at the start):
        u_m = sum_{i<=m} z_i + d                     layer-wise feature summation
        d  <- d + LSA_m.branch(u_m)                  (`lsa_input=sum`), or of u_m - sum_{i<m} z_i (`corrected`)
        y  = u_M - sum_{i<M} z_i = z_M + d           bias correction (`bias_correction=False`: y = u_M)
        logits = head(norm(pool(y)))                 norm = the backbone's frozen final norm
    With `up` zero at init, y = z_M: LAST starts as a probe on the last tapped block.
    """

    method: ClassVar[str] = "last"
    aliases: ClassVar[dict[str, str]] = {"rank": "r", "num_heads": "heads"}

    r: int = field(default=16, metadata={"help": "Rank r: Q/K/V width of every LSA block (r << D)."})
    heads: int = field(default=1, metadata={"help": "Attention heads inside the r-dimensional space."})
    taps: list[int] | None = field(
        default=None, metadata={"help": "Backbone blocks whose outputs feed the side network (None: all)."}
    )
    lsa_input: str = field(
        default="sum", metadata={"help": "What each LSA reads: `sum` (u_m) or `corrected` (u_m - sum_{i<m} z_i)."}
    )
    bias_correction: bool = field(default=True, metadata={"help": "Head reads u_M - sum_{i<M} z_i (else u_M)."})
    pool: str = field(default="mean", metadata={"help": "`mean` of patch / real tokens (DTL) or `token` (CLS)."})
    bias: bool = field(default=True, metadata={"help": "Biases in the Q/K/V and up projections."})

    def __post_init__(self) -> None:
        check(isinstance(self.r, int) and self.r > 0, f"`r` must be a positive integer, got {self.r!r}")
        check(
            isinstance(self.heads, int) and self.heads > 0 and self.r % self.heads == 0,
            f"`heads` must be a positive divisor of `r` ({self.r}), got {self.heads!r}",
        )
        check(self.lsa_input in LSA_INPUTS, f"`lsa_input` must be one of {LSA_INPUTS}, got {self.lsa_input!r}")
        check(self.pool in POOLS, f"`pool` must be one of {POOLS}, got {self.pool!r}")
        check(self.taps is None or len(self.taps) > 0, "`taps` must name at least one block")
