"""Save a KV-head-compressed model as a standard Hugging Face folder, plus `compression.json`.

    out/config.json            num_key_value_heads = K (decoders; BERT keeps its shapes, see fold.py)
    out/model.safetensors      the folded weights
    out/tokenizer*             the model's tokenizer
    out/compression.json       method, config, groups, per-layer K/V reconstruction errors, calibration, extras

`AutoModelForCausalLM.from_pretrained(out)` (or `AutoModel` for an encoder) loads it with no thrifty code. The folder
is written next to `out` and renamed into place, so a reader never sees half of it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from thrifty.compress.kv_heads.api import kv_heads_report
from thrifty.compress.kv_heads.sites import unwrap
from thrifty.errors import CheckpointError, ResultsExistError
from thrifty.io import read_json, save_tensors, write_json


COMPRESSION_FILE = "compression.json"


def _save_hf(hf: nn.Module, path: str) -> None:
    """`save_pretrained` without the GGUF quantization marker: the weights in memory are already dequantized floats,
    and a config that still says `quant_method: gguf` would make from_pretrained look for a .gguf file."""
    config = hf.config
    qc = getattr(config, "quantization_config", None)
    quant = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    drop = qc is not None and str(getattr(quant, "value", quant)) == "gguf"
    saved = {}
    if drop:
        saved = {"config": qc, "quantizer": getattr(hf, "hf_quantizer", None)}
        del config.quantization_config
        if hasattr(hf, "hf_quantizer"):
            hf.hf_quantizer = None
    try:
        hf.save_pretrained(path)
    finally:
        if drop:
            config.quantization_config = saved["config"]
            if hasattr(hf, "hf_quantizer"):
                hf.hf_quantizer = saved["quantizer"]


def save_compressed(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    tokenizer: Any = None,
    extra: dict[str, Any] | None = None,
    tensors: dict[str, dict[str, torch.Tensor]] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `model` (compressed by `compress_kv_heads_`) as a Hugging Face folder at `path`; returns the path.
    `extra` entries (e.g. `heal`: the healing recipe) are added to compression.json; `tensors` maps more file names
    to state dicts written as safetensors in the same folder (e.g. a classifier head)."""
    from thrifty.version import __version__

    hf, default_tok = unwrap(model)
    report = kv_heads_report(model) or kv_heads_report(hf)
    if report is None:
        raise CheckpointError("this model was not compressed by compress_kv_heads_; nothing to save as kv_heads")
    if not hasattr(hf, "save_pretrained"):
        raise CheckpointError(f"{type(hf).__name__} is not a transformers model; cannot write a Hugging Face folder")
    out = Path(path)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ResultsExistError(f"{out} exists and is not empty; pass overwrite=True or choose another directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _save_hf(hf, str(tmp))
        tok = tokenizer if tokenizer is not None else default_tok
        if tok is not None:
            tok.save_pretrained(str(tmp))
        for name, state in (tensors or {}).items():
            save_tensors(tmp / name, state)
        write_json(tmp / COMPRESSION_FILE, {**report, **(extra or {}), "thrifty_version": __version__})
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def load_compressed(path: str | os.PathLike, **kwargs: Any) -> tuple[nn.Module, dict[str, Any]]:
    """(model, compression.json) of a saved folder, loaded by plain transformers (causal LM when the config's
    architecture is one, else AutoModel)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    path = Path(path)
    report = read_json(path / COMPRESSION_FILE)
    arch = AutoConfig.from_pretrained(path).architectures or []
    auto = AutoModelForCausalLM if any(a.endswith("ForCausalLM") for a in arch) else AutoModel
    return auto.from_pretrained(path, **kwargs), report
