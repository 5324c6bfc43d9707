"""The one backbone protocol every method reads from (see docs/methods.md and design.md).

A backbone wraps one upstream model (timm, Hugging Face, a packaged CNN) without forking it:

    h, ctx = embed(x)                     # (B, N, D) tokens (or (B, C, H, W) for a CNN stem), ctx = attention mask
    for i in range(len(blocks)): h = run_block(i, h, ctx)
    feats = pool(norm(h), ctx)            # (B, num_features)

`forward_taps(x, indices)` returns the outputs of the chosen blocks without running any head.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from thrifty.backbones.preprocess import ImagePreprocess, TextPreprocess
from thrifty.backbones.spec import BackboneSpec


Inputs = torch.Tensor | dict[str, torch.Tensor]


@dataclass(frozen=True)
class AdapterSite:
    """Where a parallel adapter attaches in one block: it reads the input of `read` and adds to the output of `add`.

    timm ViT: read = `norm2` (its input is the post-attention residual stream), add = `mlp`.
    BERT (post-LN): read = `intermediate` (input = attention output), add = `output.dense` (before its LayerNorm).
    EfficientNet: read = add = a residual MBConv block (the adapter runs beside the whole block, 1x1 convs).
    """

    read: nn.Module
    add: nn.Module
    dim: int
    channel_dim: int = -1  # 1 for (B, C, H, W) feature maps (CNNs)


@dataclass(frozen=True)
class ProjectionSite:
    """Output columns [start, stop) of the nn.Linear `parent.<attr>`: where a LoRA-style update of one attention
    projection is added (Bi-LoRA). timm ViT: q = attn.qkv[0:D], v = attn.qkv[2D:3D] of the fused qkv Linear;
    BERT: q = attention.self.query[0:D], v = attention.self.value[0:D]."""

    parent: nn.Module
    attr: str
    start: int
    stop: int

    @property
    def linear(self) -> nn.Module:
        return getattr(self.parent, self.attr)


class Backbone(nn.Module):
    """Base class; subclasses implement the upstream-specific pieces."""

    kind: str = "?"  # "vit" | "text" | "cnn"
    spec: BackboneSpec | None = None  # how it was built (set by load_backbone)

    def __init__(self, name: str, model: nn.Module, preprocess: ImagePreprocess | TextPreprocess, source: str):
        super().__init__()
        self.name = name
        self.model = model
        self.preprocess = preprocess
        self.source = source  # where the weights came from: "pretrained", "random", a checkpoint path
        self.checkpoint_hash: str | None = None

    # --- protocol -------------------------------------------------------------------------------------------
    @property
    def blocks(self) -> nn.ModuleList:
        raise NotImplementedError

    @property
    def num_features(self) -> int:
        raise NotImplementedError

    @property
    def tap_dim(self) -> int:
        """Channel width D of the tensors `forward_taps` returns."""
        return self.num_features

    def embed(self, x: Inputs) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError

    def run_block(self, index: int, h: torch.Tensor, ctx: Any) -> torch.Tensor:
        return self.blocks[index](h)

    def norm(self, h: torch.Tensor) -> torch.Tensor:
        return h

    def pool(self, h: torch.Tensor, ctx: Any) -> torch.Tensor:
        raise NotImplementedError

    def token_mask(self, ctx: Any, h: torch.Tensor) -> torch.Tensor | None:
        """(B, N) bool mask of real tokens (None: all tokens are real)."""
        return None

    def adapter_sites(self) -> list[AdapterSite]:
        raise NotImplementedError(f"{type(self).__name__} has no adapter sites")

    def attention_qv_sites(self) -> list[tuple[ProjectionSite, ProjectionSite]]:
        """(query, value) projection sites of each block's self-attention, in block order (input = the attention
        input, i.e. norm1(x) in a pre-LN ViT)."""
        raise NotImplementedError(f"{type(self).__name__} has no attention q/v sites")

    def default_target_modules(self) -> list[str]:
        """PEFT-style default LoRA targets for this architecture."""
        raise NotImplementedError(f"{type(self).__name__} has no default LoRA targets; pass target_modules")

    def low_rank_targets(self) -> list[str]:
        """PEFT-style names (relative to `model`) of the linear layers low-rank compressors factorize by default."""
        raise NotImplementedError(f"{type(self).__name__} has no default low-rank targets; pass target_modules")

    # --- data-shaped architectures ------------------------------------------------------------------------------
    def fit_to_task_(self, task: Any, seed: int = 0) -> None:
        """Build the parts of the architecture that come from the data, once the task is loaded (called by
        run_training and the CLI after load_data). A no-op for pretrained backbones; a CTR model builds one
        embedding table per field, sized by the field's vocabulary (thrifty.backbones.ctr)."""

    def data_schema(self) -> dict[str, Any] | None:
        """What `fit_to_task_` took from the data (JSON-able; None: the architecture is fixed by the spec)."""
        return None

    def build_from_schema_(self, schema: dict[str, Any], seed: int = 0) -> None:
        """Rebuild the data-shaped parts from a saved `data_schema()` (checkpoints, fresh worker processes)."""
        raise NotImplementedError(f"{type(self).__name__} has no data-shaped parts")

    def upstream_head_name(self) -> str | None:
        """Name of the upstream model's own classifier slot that thrifty emptied (timm ViT: `head`), where a
        Linear(num_features, C) placed there makes the upstream forward equal thrifty's `head(features)`. LoRA files
        store thrifty's head there as PEFT's `modules_to_save`; None: no such slot (the head gets its own file)."""
        return None

    # --- derived ----------------------------------------------------------------------------------------------
    def forward_features(self, x: Inputs) -> torch.Tensor:
        """(B, num_features) pooled features."""
        h, ctx = self.embed(x)
        for i in range(len(self.blocks)):
            h = self.run_block(i, h, ctx)
        return self.pool(self.norm(h), ctx)

    def forward(self, x: Inputs) -> torch.Tensor:
        return self.forward_features(x)

    def forward_taps(self, x: Inputs, indices: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Outputs of blocks `indices` (default: all), each (B, N, D) ((B, C, H, W) for CNN stages); no head."""
        n = len(self.blocks)
        wanted = list(range(n)) if indices is None else [i % n for i in indices]
        h, ctx = self.embed(x)
        taps: dict[int, torch.Tensor] = {}
        for i in range(max(wanted) + 1):
            h = self.run_block(i, h, ctx)
            if i in wanted:
                taps[i] = h
        return [taps[i] for i in wanted]

    def random_inputs(self, batch_size: int, seed: int = 0) -> Inputs:
        """Random inputs of the backbone's input shape (profiling, tests)."""
        return self.preprocess.random_inputs(batch_size, torch.Generator().manual_seed(seed))

    def describe(self) -> dict[str, Any]:
        return {
            "backbone": self.name,
            "kind": self.kind,
            "source": self.source,
            "checkpoint_hash": self.checkpoint_hash,
            "num_features": self.num_features,
            "num_blocks": len(self.blocks),
            "preprocess": self.preprocess.describe(),
        }

    def freeze_(self) -> Backbone:
        for p in self.parameters():
            p.requires_grad_(False)
        return self


def file_sha256(path: str, limit_mb: int | None = None) -> str:
    """Hex SHA-256 of a file (the whole file unless `limit_mb`)."""
    h = hashlib.sha256()
    left = None if limit_mb is None else limit_mb << 20
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            if left is not None:
                chunk = chunk[:left]
                left -= len(chunk)
            h.update(chunk)
            if left is not None and left <= 0:
                break
    return h.hexdigest()


def model_fingerprint(model: nn.Module) -> str:
    """Short hash of a model's parameter names, shapes and a sample of values (identifies random-init weights)."""
    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        flat = p.detach().reshape(-1)
        if flat.numel() and flat.is_floating_point():
            h.update(flat[:: max(1, flat.numel() // 64)].float().numpy().tobytes())
    return h.hexdigest()[:16]
