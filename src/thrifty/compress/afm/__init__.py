"""`afm`: low-rank compression by (atomic) feature mimicking, for CTR models and transformers (compression.md §5).

    compress_(model, AFMConfig(size_ratio=3.0), calib_batches)       # one call: statistics -> ranks -> factors
    save_afm(model, "out/"); model, info = load_compressed("out/")
    thrifty compress --method afm --backbone ctr:deepfm --data movielens-100k --adapter runs/deepfm \\
        --size-ratio 3 --calib-samples 80000 --output out/

Registered on the compressor registry under `AFMConfig.method`; docs/methods.md ("AFM") has the equations, the
choices made where the paper is silent, and the benchmarks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from thrifty.compress.afm.apply import apply_afm_, convert_, prepare_, prepare_for_loading_
from thrifty.compress.afm.config import AFMConfig
from thrifty.compress.afm.factor import LowRankLinear, afm_linear, afm_table, merge_tables, svd_linear, svd_table
from thrifty.compress.afm.serialize import MANIFEST, load_afm, save_afm
from thrifty.compress.afm.stats import FeatureStats, eig_desc
from thrifty.compress.registry import register_compressor


def export_onnx(model: nn.Module, path: str, example_inputs: Any, opset: int = 18) -> str:
    """Float ONNX graph with a dynamic batch axis (CTR: one int64 input per field; text: ids + mask)."""
    from thrifty.compress.onnx_graph import export_graph

    return export_graph(model.eval(), path, example_inputs, opset=opset, optimize=True)


def summarize(model: nn.Module) -> dict[str, Any]:
    return {"afm": model.thrifty_compress["summary"]}


def cli_calibration(task, n: int, batch_size: int, seed: int):
    """A seeded random sample of `n` training-split samples (never test), read a batch at a time; for CTR pass
    `--calib-samples` of the training split's size to use all of it (the paper's proxy set)."""
    from torch.utils.data import BatchSampler

    from thrifty.data.base import batch_loader

    train = task.split("train")
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[: min(n, len(train))]
    order = sorted(idx.tolist())
    return list(batch_loader(train, BatchSampler(order, batch_size, drop_last=False)))


register_compressor(
    AFMConfig,
    apply=apply_afm_,
    save=save_afm,
    load=load_afm,
    manifest=MANIFEST,
    config_key="config",
    export_onnx=export_onnx,
    summarize=summarize,
    cli_calibration=cli_calibration,
)

__all__ = [
    "AFMConfig",
    "FeatureStats",
    "LowRankLinear",
    "afm_linear",
    "afm_table",
    "apply_afm_",
    "convert_",
    "eig_desc",
    "export_onnx",
    "load_afm",
    "merge_tables",
    "prepare_",
    "prepare_for_loading_",
    "save_afm",
    "svd_linear",
    "svd_table",
]
