"""Sweeps: a grid of training/method options becomes N `Member`s that the one Trainer trains on one data pass
(side methods share each batch's backbone pass or cached taps). A configuration is selected only on val
(--select-on-val: train800 -> val200), never on test."""

from __future__ import annotations

import itertools
import re
import typing
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from thrifty.errors import ConfigError
from thrifty.objectives import Objective
from thrifty.train.config import TrainConfig
from thrifty.tuners import get_method, get_tuned_model, make_config
from thrifty.values import coerce


@dataclass
class Member:
    """One model trained by the Trainer: its recipe (lr etc. may differ between sweep members), its output
    directory, optimizer, history, best epoch on val and, if its loss stopped being finite, why."""

    model: nn.Module
    train: TrainConfig
    name: str = ""
    values: dict[str, str] = field(default_factory=dict)
    output_dir: str | None = None
    optimizer: torch.optim.Optimizer | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=lambda: {"epoch": None, "value": None})
    best_state: dict[str, torch.Tensor] | None = None
    failed: str | None = None

    def live_state(self) -> dict[str, torch.Tensor]:
        """What training changes: trainable parameters and, where the backbone's statistics train (BatchNorm in
        full fine-tuning), those buffers (`TunedModel._saved_tensors`)."""
        if hasattr(self.model, "_saved_tensors"):
            return self.model._saved_tensors()
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def state_copy(self) -> dict[str, torch.Tensor]:
        return {n: t.detach().to("cpu", copy=True) for n, t in self.live_state().items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        live = self.live_state()
        with torch.no_grad():
            for k, v in state.items():
                live[k].copy_(v)


TRAIN_KEYS = ("lr", "weight_decay", "warmup_epochs", "min_lr", "grad_clip", "label_smoothing")
SHARED_KEYS = ("epochs", "batch_size", "seed", "select_on_val", "device", "amp", "eval_batch_size")


def parse_sweep(items: list[str]) -> dict[str, list[str]]:
    """['lr=1e-3,3e-3', 'r=8,16'] -> {'lr': ['1e-3', '3e-3'], 'r': ['8', '16']}."""
    out: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().replace("-", "_")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key or not vals:
            raise ConfigError(f"--sweep expects KEY=V1,V2,..., got {item!r}")
        if key in SHARED_KEYS:
            raise ConfigError(f"--sweep {key}: every member shares the batches, so `{key}` cannot vary")
        if key in out:
            raise ConfigError(f"--sweep {key} is given twice")
        out[key] = vals
    return out


def grid(sweep: dict[str, list[str]]) -> list[dict[str, str]]:
    """Every combination, in the order of the keys (the last key varies fastest)."""
    keys = list(sweep)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(sweep[k] for k in keys))]


def member_name(values: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in values.items())


def member_dir(values: dict[str, str]) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "", "_".join(f"{k}-{v}" for k, v in values.items()))


def build_members(
    backbone,
    num_classes: int | None,
    method: str,
    sweep: dict[str, list[str]],
    overrides: dict[str, Any],
    train: TrainConfig,
    objective: Objective,
    output_dir: str | None = None,
) -> list[Member]:
    """One Member per grid point; each model is built right after `torch.manual_seed(train.seed)`, as a single
    run builds its model, so a member starts from the same weights as its separate run."""
    config_cls, _ = get_method(method)
    names = set(config_cls.__dataclass_fields__) | set(config_cls.aliases)
    hints = typing.get_type_hints(TrainConfig)
    unknown = [k for k in sweep if k not in TRAIN_KEYS and k not in names]
    if unknown:
        raise ConfigError(f"--sweep {unknown[0]}: not a training option {TRAIN_KEYS} nor an option of {method}")
    members = []
    for values in grid(sweep):
        train_values = {k: coerce(v, hints[k], k) for k, v in values.items() if k in TRAIN_KEYS}
        method_values = {k: v for k, v in values.items() if k not in TRAIN_KEYS}
        torch.manual_seed(train.seed)
        model = get_tuned_model(
            backbone, make_config(method, {**overrides, **method_values}), num_classes, objective=objective
        )
        out = f"{output_dir}/{member_dir(values)}" if output_dir else None
        members.append(Member(model, replace(train, **train_values), member_name(values), values, out))
    return members


def summarize(
    rows: list[dict[str, Any]], keys: list[str], select_on_val: bool, seconds: float, objective: Objective
) -> dict[str, Any]:
    """Pick the best member on the objective's val metric (never test); a Markdown table of every member."""
    val, test = f"val_{objective.selection_metric}", f"test_{objective.metric_names[0]}"
    ok = [r for r in rows if r["status"] == "complete" and r.get(val) is not None]
    pick = max if objective.greater_is_better else min
    selected = pick(ok, key=lambda r: r[val])["name"] if select_on_val and ok else None
    cols = [*keys, val, "selected_epoch", test, "status"]

    def fmt(v: Any) -> str:
        return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join([*cols, "selected"]) + " |", "|" + "---|" * (len(cols) + 1)]
    for r in rows:
        lines.append("| " + " | ".join([*(fmt(r.get(c)) for c in cols), "*" if r["name"] == selected else ""]) + " |")
    note = (
        f"selection: best {val.replace('_', ' ')} (val split), never test"
        if select_on_val
        else "no selection: train with --select-on-val to pick a configuration on the val split"
    )
    return {"members": rows, "selected": selected, "selection": note, "seconds": seconds, "table": "\n".join(lines)}
