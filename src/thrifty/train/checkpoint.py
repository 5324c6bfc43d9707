"""One-file training checkpoints (safetensors; JSON state in its metadata), written atomically each epoch."""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from thrifty.errors import CheckpointError
from thrifty.io import save_tensors


CHECKPOINT_NAME = "checkpoint.safetensors"


def save_checkpoint(
    path: str,
    *,
    model_state: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    extra: dict[str, torch.Tensor] | None = None,
) -> None:
    tensors = {f"model.{k}": v for k, v in model_state.items()}
    opt = optimizer.state_dict()
    for idx, st in opt["state"].items():
        for key, value in st.items():
            t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"opt.{idx}.{key}"] = t
    groups = [{k: v for k, v in g.items()} for g in opt["param_groups"]]
    tensors["rng.torch"] = torch.get_rng_state()
    for k, v in (extra or {}).items():
        tensors[f"extra.{k}"] = v
    meta = {"state": json.dumps(state), "param_groups": json.dumps(groups)}
    save_tensors(path, tensors, meta)


def load_checkpoint(path: str) -> dict[str, Any]:
    """Returns {'model': {...}, 'optimizer': state_dict, 'state': {...}, 'extra': {...}, 'rng': tensor}."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}; start without --resume")
    try:
        with safe_open(path, framework="pt") as fh:
            meta = fh.metadata()
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except Exception as exc:  # safetensors raises several types for truncated files
        raise CheckpointError(f"checkpoint {path} is unreadable ({exc}); it may be truncated") from exc
    out: dict[str, Any] = {"model": {}, "extra": {}, "state": json.loads(meta["state"])}
    opt_state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        head, _, rest = k.partition(".")
        if head == "model":
            out["model"][rest] = v
        elif head == "extra":
            out["extra"][rest] = v
        elif head == "opt":
            idx, _, key = rest.partition(".")
            opt_state.setdefault(int(idx), {})[key] = v
        elif k == "rng.torch":
            out["rng"] = v
    out["optimizer"] = {"state": opt_state, "param_groups": json.loads(meta["param_groups"])}
    return out
