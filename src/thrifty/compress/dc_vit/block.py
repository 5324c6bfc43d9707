"""The compressed block (spec §3.2) and the per-architecture surgery behind it.

timm ViT (pre-LN) block, attention branch (norm1, attn, ls1, drop_path1) deleted:

    x <- x + drop_path2(ls2(FC2[:, S](act(FC1[S, :](norm2(x))))))          # FFNBlock

BERT (post-LN) layer, `a = LN_a(x + Attn(x))`, `y = LN_o(a + FC2(act(FC1(a))))`. The attention branch is
self-attention plus its output projection (`attention.self`, `attention.output.dense`); `LN_a`
(`attention.output.LayerNorm`) normalises the residual stream, not the branch, so it stays: with the branch removed
`a = LN_a(x)`, exactly the layer with its attention output zeroed (FFNBertLayer).

S is a subset of the MLP's hidden units, in original-unit indices (`units`); norm2 / LN_a / LN_o, FC2's bias and
LayerScale are copied. Module paths (and so state-dict keys) are the upstream ones, so a compressed timm model's
state dict loads into timm's VisionTransformer once the same blocks are rebuilt (`apply_structure_`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from thrifty.errors import SpecError


class FFNBlock(nn.Module):
    """A timm ViT block without its attention branch: (B, N, D) -> (B, N, D)."""

    def __init__(self, norm2: nn.Module, mlp: nn.Module, ls2: nn.Module, drop_path2: nn.Module, units: Sequence[int]):
        super().__init__()
        self.norm2, self.mlp, self.ls2, self.drop_path2 = norm2, mlp, ls2, drop_path2
        self.units = [int(u) for u in units]  # original hidden-unit indices (not in the state dict)

    def forward(self, x: torch.Tensor, attn_mask: Any = None, is_causal: bool = False, **kwargs: Any) -> torch.Tensor:
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class _NormOnly(nn.Module):
    """Holds `LayerNorm` at the upstream path `attention.output.LayerNorm`."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.LayerNorm = norm


class _AttentionNorm(nn.Module):
    def __init__(self, norm: nn.Module):
        super().__init__()
        self.output = _NormOnly(norm)


class FFNBertLayer(nn.Module):
    """A post-LN BERT layer without its attention branch: `a = LN_a(x)`, `y = LN_o(a + FC2(act(FC1(a))))`."""

    def __init__(self, attention_norm: nn.Module, intermediate: nn.Module, output: nn.Module, units: Sequence[int]):
        super().__init__()
        self.attention = _AttentionNorm(attention_norm)
        self.intermediate, self.output = intermediate, output
        self.units = [int(u) for u in units]

    def forward(self, hidden_states: torch.Tensor, attention_mask: Any = None, *args: Any, **kwargs: Any):
        a = self.attention.output.LayerNorm(hidden_states)
        return self.output(self.intermediate(a), a)


class DroppedBlock(nn.Module):
    """The block-dropping baseline: the identity (B, N, D) -> (B, N, D)."""

    def __init__(self):
        super().__init__()
        self.units: list[int] = []

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x


def _copy_without(module: nn.Module, names: Sequence[str]) -> nn.Module:
    """A deep copy of `module` whose children `names` are left out (the caller sets new ones)."""
    saved = {n: module._modules[n] for n in names}
    try:
        for n in names:
            module._modules[n] = None
        return copy.deepcopy(module)
    finally:
        module._modules.update(saved)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin.requires_grad_(False)  # frozen like the backbone it joins; the recovery unfreezes what trains


class BlockOps:
    """Where a block's attention branch and MLP live; subclasses per architecture (timm ViT, BERT)."""

    kind = "?"

    def matches(self, block: nn.Module) -> bool:
        raise NotImplementedError

    def attention_modules(self, block: nn.Module) -> list[nn.Module]:
        """Modules of the attention branch the compressed block deletes (their MACs are M_a)."""
        raise NotImplementedError

    def mlp_modules(self, block: nn.Module) -> list[nn.Module]:
        """Modules whose MACs scale with the kept hidden units (M_m)."""
        raise NotImplementedError

    def fc1(self, block: nn.Module) -> nn.Linear:
        raise NotImplementedError

    def fc2(self, block: nn.Module) -> nn.Linear:
        raise NotImplementedError

    def act_module(self, block: nn.Module) -> nn.Module:
        """The module whose output is the (B, N, H) post-activation hidden state."""
        raise NotImplementedError

    def _build(self, src: nn.Module, fc1: nn.Linear, fc2: nn.Linear, units: list[int]) -> nn.Module:
        raise NotImplementedError

    def prefix_parameters(self, backbone: nn.Module, train_norm: bool) -> list[nn.Parameter]:
        """Parameters outside the blocks that the recovery trains (embeddings, and the final norm if asked)."""
        raise NotImplementedError

    # --- shared -------------------------------------------------------------------------------------------
    def is_compressed(self, block: nn.Module) -> bool:
        return isinstance(block, (FFNBlock, FFNBertLayer, DroppedBlock))

    def units(self, block: nn.Module) -> list[int]:
        """Original hidden-unit indices the block holds (all of them for an original block)."""
        if isinstance(block, DroppedBlock):
            return []
        if isinstance(block, (FFNBlock, FFNBertLayer)):
            return list(block.units)
        return list(range(self.fc1(block).out_features))

    def hidden(self, block: nn.Module) -> int:
        return int(self.fc1(block).out_features)

    def compress(self, student: nn.Module, teacher: nn.Module, units: Sequence[int]) -> nn.Module:
        """The compressed block keeping original units `units`: each unit's FC1 row and FC2 column come from the
        student block when it holds the unit (its current, possibly recovered, weights), else from the original
        teacher block. Norms, FC2's bias and LayerScale come from the student block."""
        if isinstance(student, DroppedBlock):
            raise SpecError("a dropped block cannot be compressed again; start from the original model")
        own = {u: i for i, u in enumerate(self.units(student))}
        units = sorted(int(u) for u in units)
        s1, s2, t1, t2 = self.fc1(student), self.fc2(student), self.fc1(teacher), self.fc2(teacher)
        rows_w, rows_b, cols = [], [], []
        for u in units:
            src1, src2, j = (s1, s2, own[u]) if u in own else (t1, t2, u)
            rows_w.append(src1.weight[j])
            rows_b.append(None if src1.bias is None else src1.bias[j])
            cols.append(src2.weight[:, j])
        d = s1.in_features
        w1 = torch.stack(rows_w) if rows_w else s1.weight.new_zeros(0, d)
        b1 = None if s1.bias is None else (torch.stack(rows_b) if rows_b else s1.bias.new_zeros(0))
        w2 = torch.stack(cols, 1) if cols else s2.weight.new_zeros(s2.out_features, 0)
        with torch.no_grad():
            fc1 = _linear(w1.detach(), None if b1 is None else b1.detach())
            fc2 = _linear(w2.detach(), None if s2.bias is None else s2.bias.detach())
        return self._build(student, fc1, fc2, units)

    def drop(self, block: nn.Module) -> nn.Module:
        return DroppedBlock()

    def empty(self, block: nn.Module, n_units: int | None) -> nn.Module:
        """A compressed block of the right shapes (weights to be loaded): `n_units=None` for a dropped block."""
        if n_units is None:
            return DroppedBlock()
        return self.compress(block, block, list(range(n_units)))


class TimmOps(BlockOps):
    kind = "timm_vit"

    def matches(self, block: nn.Module) -> bool:
        if isinstance(block, FFNBlock):
            return True
        mlp = getattr(block, "mlp", None)
        fc1, fc2 = getattr(mlp, "fc1", None), getattr(mlp, "fc2", None)
        return (
            hasattr(block, "attn")
            and hasattr(block, "norm2")
            and isinstance(fc1, nn.Linear)
            and isinstance(fc2, nn.Linear)
            and fc1.out_features == fc2.in_features  # not a gated (GLU) MLP
            and isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity)  # no norm over the hidden units
        )

    def attention_modules(self, block: nn.Module) -> list[nn.Module]:
        return [block.norm1, block.attn]

    def mlp_modules(self, block: nn.Module) -> list[nn.Module]:
        return [block.mlp]

    def fc1(self, block: nn.Module) -> nn.Linear:
        return block.mlp.fc1

    def fc2(self, block: nn.Module) -> nn.Linear:
        return block.mlp.fc2

    def act_module(self, block: nn.Module) -> nn.Module:
        return block.mlp.act

    def _build(self, src: nn.Module, fc1: nn.Linear, fc2: nn.Linear, units: list[int]) -> nn.Module:
        mlp = _copy_without(src.mlp, ("fc1", "fc2"))
        mlp.fc1, mlp.fc2 = fc1, fc2
        return FFNBlock(copy.deepcopy(src.norm2), mlp, copy.deepcopy(src.ls2), copy.deepcopy(src.drop_path2), units)

    def prefix_parameters(self, backbone: nn.Module, train_norm: bool) -> list[nn.Parameter]:
        model = backbone.model
        after = {"blocks", "norm", "fc_norm", "head", "head_drop", "attn_pool"}
        out = [p for name, m in model.named_children() if name not in after for p in m.parameters()]
        out += [p for name, p in model.named_parameters(recurse=False)]  # cls_token, pos_embed, reg_token
        if train_norm:
            out += list(model.norm.parameters())
        return out


class BertOps(BlockOps):
    kind = "bert"

    def matches(self, block: nn.Module) -> bool:
        if isinstance(block, FFNBertLayer):
            return True
        att = getattr(block, "attention", None)
        return (
            hasattr(att, "self")
            and hasattr(getattr(att, "output", None), "LayerNorm")
            and isinstance(getattr(getattr(block, "intermediate", None), "dense", None), nn.Linear)
            and isinstance(getattr(getattr(block, "output", None), "dense", None), nn.Linear)
        )

    def attention_modules(self, block: nn.Module) -> list[nn.Module]:
        return [block.attention.self, block.attention.output.dense]

    def mlp_modules(self, block: nn.Module) -> list[nn.Module]:
        return [block.intermediate, block.output.dense]

    def fc1(self, block: nn.Module) -> nn.Linear:
        return block.intermediate.dense

    def fc2(self, block: nn.Module) -> nn.Linear:
        return block.output.dense

    def act_module(self, block: nn.Module) -> nn.Module:
        return block.intermediate

    def _build(self, src: nn.Module, fc1: nn.Linear, fc2: nn.Linear, units: list[int]) -> nn.Module:
        inter = _copy_without(src.intermediate, ("dense",))
        inter.dense = fc1
        out = _copy_without(src.output, ("dense",))
        out.dense = fc2
        return FFNBertLayer(copy.deepcopy(src.attention.output.LayerNorm), inter, out, units)

    def prefix_parameters(self, backbone: nn.Module, train_norm: bool) -> list[nn.Parameter]:
        return list(backbone.model.embeddings.parameters())  # post-LN: no final norm outside the blocks


OPS = (TimmOps(), BertOps())


def block_ops(backbone: nn.Module) -> BlockOps:
    """The surgery for `backbone`'s blocks; SpecError for blocks without a separable attention branch and MLP."""
    blocks = getattr(backbone, "blocks", None)
    if blocks is None or len(blocks) == 0:
        raise SpecError(f"{type(backbone).__name__} exposes no blocks; DC-ViT needs a ViT-style Backbone")
    for ops in OPS:
        if all(ops.matches(b) or isinstance(b, DroppedBlock) for b in blocks):
            return ops
    raise SpecError(
        f"the blocks of {getattr(backbone, 'name', type(backbone).__name__)} ({type(blocks[0]).__name__}) have no "
        "attention branch and plain MLP DC-ViT knows (timm ViT/DeiT blocks, BERT-style layers)"
    )
