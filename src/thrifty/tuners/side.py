"""`SideTuner`: base of methods whose trainable part only reads the frozen backbone's outputs (taps).

    logits = head(features_from_taps(extract_taps(backbone, x, tap_names())))

The backbone runs under `torch.no_grad()`, so nothing inside it is saved for backward and its outputs are data:
they can be cached on disk (`thrifty extract`, thrifty.features) and shared by many side networks trained
together (`thrifty train --sweep`). `read_taps_(True)` switches `forward` to take a dict of taps (a batch of the
feature cache) instead of backbone inputs; both paths run the same `features_from_taps`.
"""

from __future__ import annotations

import torch

from thrifty.backbones import Inputs
from thrifty.errors import ConfigError
from thrifty.tuners.base import TunedModel


class SideTuner(TunedModel):
    reads_taps: bool = False

    def tap_names(self) -> list[str]:
        """Taps this method reads (thrifty.features.taps names)."""
        raise NotImplementedError

    def features_from_taps(self, taps: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, D) features fed to the head, from a dict of taps."""
        raise NotImplementedError

    def forward_from_taps(self, taps: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, num_classes) logits from a dict of taps."""
        return self.head(self.features_from_taps(self.float_taps(taps)))

    def float_taps(self, taps: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`taps` with floating tensors in the head's dtype (exact: fp16 -> fp32 is lossless). On CPU the training
        loops read a float16 cache already widened (one copy out of the map); on CUDA its batches travel as float16
        and are widened here, once per batch; for taps already in the head's dtype this is a no-op."""
        dtype = next(self.head.parameters()).dtype
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in taps.items()}

    def extract(self, x: Inputs) -> dict[str, torch.Tensor]:
        """The taps of this method for backbone inputs `x` (no_grad)."""
        from thrifty.features.taps import extract_taps

        return extract_taps(self.backbone, x, self.tap_names())

    def read_taps_(self, enabled: bool = True) -> SideTuner:
        """Make `forward`/`features` take tap dicts (cached features) instead of backbone inputs; returns self."""
        self.reads_taps = enabled
        return self

    def features(self, x: Inputs | dict[str, torch.Tensor]) -> torch.Tensor:
        return self.features_from_taps(self.float_taps(x) if self.reads_taps else self.extract(x))


def pool_tokens(h: torch.Tensor, mask: torch.Tensor | None, num_prefix: int, mode: str = "mean") -> torch.Tensor:
    """(B, N, D) -> (B, D). `mean`: mean over the patch tokens (tokens after the `num_prefix` CLS/register tokens;
    with a (B, N) `mask`, only the real tokens), the DTL pooling; `token`: the first token (CLS)."""
    if mode == "token":
        return h[:, 0]
    tokens = h[:, num_prefix:]
    if mask is None:
        return tokens.mean(1)
    m = mask[:, num_prefix:].unsqueeze(-1).to(h.dtype)  # (B, N - p, 1)
    return (tokens * m).sum(1) / m.sum(1).clamp_min(1.0)


def require_side(model: TunedModel, purpose: str) -> None:
    """Raise ConfigError unless `model` is a side method (reads only the frozen backbone's outputs)."""
    from thrifty.tuners.registry import available_methods, get_method

    if not isinstance(model, SideTuner):
        side = [m for m in available_methods() if issubclass(get_method(m)[1], SideTuner)]
        raise ConfigError(
            f"method {model.config.method!r} cannot {purpose}: it runs inside the backbone (adapts it or adds "
            f"back into it). Methods that can: {', '.join(side)}"
        )
