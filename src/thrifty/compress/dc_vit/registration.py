"""dc_vit on the compressor registry (`thrifty.compress.registry`, on main since issue 15): `compress_(model,
DCViTConfig(...), calib)`, `thrifty compress --method dc_vit --keep-macs 0.75 --samples 50`, `load_compressed`.

Not imported by this package's __init__ on the branch that predates the registry; after the merge, one line in
`dc_vit/__init__.py` (`from thrifty.compress.dc_vit import registration as _registration`) registers it. The CLI's
default calibration draw (`--calib-samples`, 512 training samples) holds the `samples` few-shot inputs and the
`metric_samples` metric set that follow them; labels are dropped unread.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from thrifty.compress.dc_vit.api import compress_dc_vit_
from thrifty.compress.dc_vit.config import DCViTConfig
from thrifty.compress.dc_vit.serialize import MANIFEST, load_dc_vit, save_dc_vit
from thrifty.compress.registry import register_compressor


def summarize(model: nn.Module) -> dict[str, Any]:
    """What results.json records: the structure, removed attention blocks, kept MLP units, MACs and ranking."""
    info = model.thrifty_dc_vit
    return {k: info[k] for k in ("structure", "removed_attention", "kept_mlp_units", "macs", "ranking")}


register_compressor(
    DCViTConfig,
    apply=compress_dc_vit_,
    save=save_dc_vit,
    load=load_dc_vit,
    manifest=MANIFEST,
    config_key="config",
    summarize=summarize,
)
