"""timm ViT/DeiT backbones (`timm:<model name>`), e.g. `timm:vit_base_patch16_224.orig_in21k`, `timm:test_vit`."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from thrifty.backbones.base import AdapterSite, Backbone, ProjectionSite, file_sha256, model_fingerprint
from thrifty.backbones.preprocess import ImagePreprocess
from thrifty.errors import CheckpointError, SpecError


class TimmViT(Backbone):
    """A timm VisionTransformer with its head removed (`num_classes=0`); heads live in thrifty's TunedModel."""

    kind = "vit"

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.blocks

    @property
    def num_features(self) -> int:
        return int(self.model.num_features)

    @property
    def num_prefix_tokens(self) -> int:
        return int(getattr(self.model, "num_prefix_tokens", 1))

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid (H', W') of the default input size."""
        return tuple(self.model.patch_embed.grid_size)

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        m = self.model
        h = m.patch_embed(x)
        h = m._pos_embed(h)  # timm's own position embedding + prefix tokens; (B, N, D)
        h = m.patch_drop(h)
        return m.norm_pre(h), None

    def norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.norm(h)

    def pool(self, h: torch.Tensor, ctx: Any) -> torch.Tensor:
        return self.model.forward_head(h, pre_logits=True)  # timm's pooling (CLS or avg) + fc_norm

    def adapter_sites(self) -> list[AdapterSite]:
        return [AdapterSite(read=b.norm2, add=b.mlp, dim=self.num_features) for b in self.blocks]

    def attention_qv_sites(self) -> list[tuple[ProjectionSite, ProjectionSite]]:
        sites = []
        for i, b in enumerate(self.blocks):
            qkv = getattr(getattr(b, "attn", None), "qkv", None)
            if qkv is None:
                raise SpecError(f"{self.name}: block {i} has no fused `attn.qkv`; q/v sites are unknown")
            d = int(qkv.out_features) // 3  # timm reshapes qkv to (B, N, 3, heads, head_dim): q | k | v
            sites.append((ProjectionSite(b.attn, "qkv", 0, d), ProjectionSite(b.attn, "qkv", 2 * d, 3 * d)))
        return sites

    def default_target_modules(self) -> list[str]:
        return ["qkv"]

    def low_rank_targets(self) -> list[str]:
        return ["attn.proj", "mlp.fc1", "mlp.fc2"]  # attention output projection and the FFN

    def upstream_head_name(self) -> str | None:
        """timm's `pretrained_cfg["classifier"]` (`head`), emptied by `num_classes=0`: `timm.create_model(name,
        num_classes=C)` runs forward_head(pre_logits) then this Linear, as TunedModel does. Distilled models (two
        heads, averaged) have no single slot."""
        name = (self.model.pretrained_cfg or {}).get("classifier")
        try:
            slot = self.model.get_submodule(name) if isinstance(name, str) else None
        except AttributeError:
            slot = None
        return name if isinstance(slot, nn.Identity) else None


def load_timm_vit(
    name: str, *, checkpoint: str | None = None, pretrained: bool | None = None, image_size: int | None = None
) -> TimmViT:
    """Build `name` with timm. Weights: `checkpoint` (.safetensors, .pth/.pt/.bin, Google .npz) or timm's hub
    weights when `pretrained` (default: True unless a checkpoint is given) or random init."""
    import timm

    if pretrained is None:
        pretrained = checkpoint is None
    kwargs: dict[str, Any] = {"num_classes": 0}
    if image_size is not None:
        kwargs["img_size"] = image_size
    try:
        model = timm.create_model(name, pretrained=pretrained and checkpoint is None, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise SpecError(f"timm has no model {name!r}; see timm.list_models() for names") from exc
        raise
    except Exception as exc:  # hub errors surface as many types
        if pretrained:
            raise SpecError(
                f"could not download pretrained weights for timm:{name} ({type(exc).__name__}: {exc}). "
                "Without network access pass checkpoint=PATH (--checkpoint) or pretrained=False (--random-init)."
            ) from exc
        raise
    source = "pretrained" if pretrained and checkpoint is None else "random"
    if checkpoint is not None:
        load_vit_checkpoint(model, checkpoint)
        source = os.path.abspath(checkpoint)
    if not hasattr(model, "blocks"):
        raise SpecError(f"timm:{name} is not a ViT-style model with `blocks`; use a ViT/DeiT name")
    cfg = model.pretrained_cfg or {}
    size = tuple(model.patch_embed.img_size)
    pre = ImagePreprocess(
        size=size,
        mean=tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(cfg.get("std", (0.229, 0.224, 0.225))),
        interpolation=cfg.get("interpolation", "bicubic"),
    )
    bb = TimmViT(name=f"timm:{name}", model=model, preprocess=pre, source=source)
    bb.checkpoint_hash = file_sha256(checkpoint, limit_mb=64) if checkpoint else model_fingerprint(model)
    return bb


def load_vit_checkpoint(model: nn.Module, path: str) -> None:
    """Load local weights into a timm ViT; a checkpoint for another backbone is refused with the key diff."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npz":  # Google's ViT-B_16.npz (the VTAB-1K literature's backbone): timm's own npz loader
        try:
            model.load_pretrained(path)
        except (KeyError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{path} does not fit {type(model).__name__}: {exc}") from exc
        return
    if ext == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(path)
    elif ext in (".pth", ".pt", ".bin"):
        state = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model", "module"):
            if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                state = state[key]
    else:
        raise CheckpointError(f"unknown checkpoint format {ext!r} for {path}; use .safetensors, .pth or .npz")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = {
        k: v
        for k, v in state.items()
        if not k.startswith(("head.", "fc_norm.", "head_drop.")) or k in model.state_dict()
    }
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    bad_shape = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad_shape:
        raise CheckpointError(
            f"checkpoint {path} is for another backbone: {len(missing)} missing keys {missing[:3]}, "
            f"{len(unexpected)} unexpected {unexpected[:3]}, shape mismatches {bad_shape[:3]}. "
            "Pick the timm model name the checkpoint was trained with."
        )
    model.load_state_dict(state, strict=True)
