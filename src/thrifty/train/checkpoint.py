"""One-file training checkpoints (safetensors; JSON state in its metadata), written atomically each epoch.

A run of N members (a sweep) keeps them all in one file, so a kill never leaves members at different epochs:
member i's tensors are `<prefix>model.*` and `<prefix>opt.*` with prefix "" for a single member and
`member<i>.` otherwise.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import torch

from thrifty.errors import CheckpointError
from thrifty.io import save_tensors


CHECKPOINT_NAME = "checkpoint.safetensors"


def member_prefix(index: int, count: int) -> str:
    return "" if count == 1 else f"member{index}."


def save_checkpoint(
    path: str,
    *,
    members: Sequence[tuple[dict[str, torch.Tensor], torch.optim.Optimizer]],
    state: dict[str, Any],
    extra: dict[str, torch.Tensor] | None = None,
) -> None:
    """`members`: (trainable state, optimizer) per member; `state`: JSON-able run state; `extra`: more tensors."""
    tensors: dict[str, torch.Tensor] = {}
    groups = []
    for i, (model_state, optimizer) in enumerate(members):
        p = member_prefix(i, len(members))
        tensors.update({f"{p}model.{k}": v for k, v in model_state.items()})
        opt = optimizer.state_dict()
        for idx, st in opt["state"].items():
            for key, value in st.items():
                tensors[f"{p}opt.{idx}.{key}"] = value if isinstance(value, torch.Tensor) else torch.tensor(value)
        groups.append([dict(g) for g in opt["param_groups"]])
    tensors["rng.torch"] = torch.get_rng_state()
    for k, v in (extra or {}).items():
        tensors[f"extra.{k}"] = v
    meta = {"state": json.dumps(state), "param_groups": json.dumps(groups), "members": str(len(members))}
    save_tensors(path, tensors, meta)


def load_checkpoint(path: str) -> dict[str, Any]:
    """Returns {'members': [{'model': {...}, 'optimizer': state_dict}, ...], 'model'/'optimizer' (member 0),
    'state': {...}, 'extra': {...}, 'rng': tensor}."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}; start without --resume")
    try:
        with safe_open(path, framework="pt") as fh:
            meta = fh.metadata()
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except Exception as exc:  # safetensors raises several types for truncated files
        raise CheckpointError(f"checkpoint {path} is unreadable ({exc}); it may be truncated") from exc
    count = int(meta.get("members", "1"))
    groups = json.loads(meta["param_groups"])
    if count == 1 and groups and isinstance(groups[0], dict):  # written before sweeps shared this format
        groups = [groups]
    members = [{"model": {}, "opt": {}} for _ in range(count)]
    out: dict[str, Any] = {"extra": {}, "state": json.loads(meta["state"])}
    for k, v in tensors.items():
        if k == "rng.torch":
            out["rng"] = v
            continue
        if k.startswith("extra."):
            out["extra"][k[6:]] = v
            continue
        i, rest = (0, k) if count == 1 else (int(k.split(".", 1)[0][6:]), k.split(".", 1)[1])
        head, _, name = rest.partition(".")
        if head == "model":
            members[i]["model"][name] = v
        elif head == "opt":
            idx, _, key = name.partition(".")
            members[i]["opt"].setdefault(int(idx), {})[key] = v
    out["members"] = [
        {"model": m["model"], "optimizer": {"state": m["opt"], "param_groups": groups[i]}}
        for i, m in enumerate(members)
    ]
    out["model"], out["optimizer"] = out["members"][0]["model"], out["members"][0]["optimizer"]
    return out
