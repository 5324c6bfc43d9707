"""`KVHeadsConfig`: how `compress_kv_heads_` merges the KV heads of every attention layer (compression.md §4).

    compress_kv_heads_(model, KVHeadsConfig(kv_heads=1), calib_batches)

Strategies (one per cache; all are a per-group projection E (g*d, d) plus per-head expansions B_h (d, d), see fit.py):

* `values` / `keys`: `svd_a` (the paper's SVD on activations: top right singular vectors of the group's concatenated
  cache), `svd_w` (the same on the stacked projection weights, no calibration), `mean` (the GQA paper's mean pooling).
* `rope_keys` (keys that go through RoPE; the paper's fix is NOT FOUND): `complex` (our design, the spec's suggestion:
  per-head maps restricted to one complex scalar per RoPE frequency pair, exact under every rotation), `post_rope`
  (an unconstrained per-head map fitted on post-RoPE keys with `svd_a`, on the weights with `svd_w`; not exact under
  rotation) or `mean`. With RoPE, `keys` still chooses the source of the fit (activations or weights).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from thrifty.errors import ConfigError


STRATEGIES = ("svd_a", "svd_w", "mean")
ROPE_STRATEGIES = ("complex", "post_rope", "mean")
GROUPINGS = ("consecutive", "similarity")
FORMAT_VERSION = 1


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass
class KVHeadsConfig:
    """Merge each layer's KV heads into `kv_heads` shared heads (groups of g = current / kv_heads heads).

    Calibration: at most `calib_samples` sequences and `calib_tokens` real (non-padding) tokens stream through the
    model; only (h*d x h*d) float64 covariances of the k/v projection outputs are kept, never the tokens.
    """

    method: ClassVar[str] = "kv_heads"
    cli_flags: ClassVar[tuple[str, ...]] = ("kv_heads", "heal_steps", "heal_lr")

    kv_heads: int = field(default=1, metadata={"help": "KV heads per layer after compression"})
    grouping: str = field(default="consecutive", metadata={"help": "consecutive | similarity"})
    values: str = field(default="svd_a", metadata={"help": "svd_a | svd_w | mean"})
    keys: str = field(default="svd_a", metadata={"help": "svd_a | svd_w | mean"})
    rope_keys: str = field(default="complex", metadata={"help": "complex | post_rope | mean (keys with RoPE)"})
    calib_samples: int | None = field(default=128, metadata={"help": "calibration sequences (None: all)"})
    calib_tokens: int | None = field(default=65536, metadata={"help": "calibration tokens (None: all)"})
    heal_steps: int = field(default=0, metadata={"help": "LoRA healing steps on the calibration text (0: none)"})
    heal_lr: float = field(default=5e-4, metadata={"help": "learning rate of the healing LoRA"})
    heal_r: int = field(default=8, metadata={"help": "rank of the healing LoRA"})
    heal_batch_size: int = field(default=4, metadata={"help": "sequences per healing step"})
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        _check(
            isinstance(self.kv_heads, int) and not isinstance(self.kv_heads, bool) and self.kv_heads >= 1,
            f"`kv_heads` must be a positive integer, got {self.kv_heads!r}",
        )
        _check(self.grouping in GROUPINGS, f"`grouping` must be one of {GROUPINGS}, got {self.grouping!r}")
        for name in ("values", "keys"):
            value = getattr(self, name)
            _check(value in STRATEGIES, f"`{name}` must be one of {STRATEGIES}, got {value!r}")
        _check(
            self.rope_keys in ROPE_STRATEGIES, f"`rope_keys` must be one of {ROPE_STRATEGIES}, got {self.rope_keys!r}"
        )
        for name in ("calib_samples", "calib_tokens"):
            value = getattr(self, name)
            _check(value is None or (isinstance(value, int) and value > 0), f"`{name}` must be None or > 0")
        _check(self.heal_steps >= 0, f"`heal_steps` must be >= 0, got {self.heal_steps!r}")
        for name in ("heal_lr", "heal_r", "heal_batch_size"):
            _check(getattr(self, name) > 0, f"`{name}` must be positive, got {getattr(self, name)!r}")

    def needs_calibration(self, has_rope: bool) -> bool:
        """Whether the fit reads activations (svd_a somewhere, or similarity grouping)."""
        key_mean = self.keys == "mean" or (has_rope and self.rope_keys == "mean")
        return self.grouping == "similarity" or self.values == "svd_a" or (self.keys == "svd_a" and not key_mean)

    def key_strategy(self, has_rope: bool) -> tuple[str, str]:
        """(source, structure) of the key fit: source in svd_a | svd_w | mean, structure in full | complex |
        post_rope. Mean pooling commutes with RoPE, so `mean` needs no RoPE structure."""
        if self.keys == "mean" or (has_rope and self.rope_keys == "mean"):
            return "mean", "full"
        if not has_rope:
            return self.keys, "full"
        return self.keys, self.rope_keys

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["method"] = self.method
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KVHeadsConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
