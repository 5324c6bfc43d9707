"""Many side networks on one backbone pass: `thrifty train ... --sweep lr=1e-3,3e-3 --sweep r=8,16`.

A side method reads only the frozen backbone's outputs, so all configurations of a sweep share each batch's
backbone pass (or the feature cache): per batch the union of the members' taps is extracted once (no_grad),
then every member takes its own optimizer step on them. One seeded sampler feeds everyone, and each member is
built from the same seed, so each member equals its separate `run_training` with that seed. The loop's pieces
are reused: GlobalBatchSampler, build_optimizer, cosine_lr, optimizer_step, evaluate_many, finish_run.

Outputs: one run directory per configuration (adapter + results.json), plus sweep.json and summary.md in
`output_dir`. A configuration is selected only on val (--select-on-val: train800 -> val200), never on test.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import time
import typing
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from thrifty.backbones import Backbone, load_backbone
from thrifty.data import TaskData, load_data
from thrifty.data.base import batch_loader
from thrifty.errors import ConfigError, ResultsExistError
from thrifty.features.taps import extract_taps
from thrifty.io import write_json, write_text
from thrifty.train.denormals import flushed_denormals
from thrifty.train.loop import (
    TrainConfig,
    _autocast,
    apply_malloc,
    evaluate_many,
    optimizer_step,
    resolve_device,
    to_device,
)
from thrifty.train.optim import build_optimizer, cosine_lr, set_lr
from thrifty.train.run import RESULTS_NAME, finish_run, measure_step, require_side, use_feature_cache
from thrifty.train.sampler import GlobalBatchSampler
from thrifty.tuners import get_method, get_tuned_model, make_config
from thrifty.tuners.config import coerce


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


@dataclass
class Member:
    """One configuration of a sweep: its method options, training options, model and optimizer state."""

    name: str
    values: dict[str, str]
    train: TrainConfig
    model: Any
    optimizer: torch.optim.Optimizer | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=lambda: {"val_accuracy": -1.0, "epoch": None})
    best_state: dict[str, torch.Tensor] | None = None
    failed: str | None = None

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().to("cpu", copy=True) for n, p in self.model.named_parameters() if p.requires_grad}


class SweepTrainer:
    """Trains `members` together on `task`; each batch's backbone pass (or cached taps) is shared."""

    def __init__(self, members: list[Member], task: TaskData, config: TrainConfig, reads_taps: bool):
        self.members, self.task, self.cfg, self.reads_taps = members, task, config, reads_taps
        self.device = resolve_device(config.device)
        self.malloc = apply_malloc(config, self.device)
        self.denormals: str | None = None  # set by fit (thrifty.train.denormals)
        self.backbone = members[0].model.backbone
        self.taps = sorted({t for m in members for t in m.model.tap_names()})
        self.train_set = task.split("tune_train" if config.select_on_val else "train")
        self.sampler = GlobalBatchSampler(len(self.train_set), config.batch_size, config.seed)
        self.loader = batch_loader(self.train_set, self.sampler, config.num_workers)
        self.steps_per_epoch = len(self.sampler)
        self.total_steps = self.steps_per_epoch * config.epochs
        for m in members:
            m.model.to(self.device)
            m.optimizer = build_optimizer(m.model, m.train.lr, m.train.weight_decay)

    def shared(self, inputs: Any) -> dict[str, torch.Tensor]:
        """The taps of every member, computed once (cached taps widened once, so members' `float_taps` are no-ops)."""
        if self.reads_taps:
            return self.members[0].model.float_taps(inputs)
        return extract_taps(self.backbone, inputs, self.taps)

    def _evaluate(self, split: str, desc: str) -> dict[str, dict[str, float]]:
        live = {m.name: m.model for m in self.members if m.failed is None}
        return evaluate_many(
            live,
            self.task.split(split),
            self.cfg.eval_batch_size or max(self.cfg.batch_size, 64),
            self.device,
            self.cfg.amp,
            progress=self.cfg.progress,
            desc=desc,
            prepare=self.shared,
            forward=lambda model, taps: model.forward_from_taps(taps),
        )

    def _step(self, m: Member, taps, labels, step: int, epoch: int) -> float:
        cfg = m.train
        warmup = round(cfg.warmup_epochs * self.steps_per_epoch)
        set_lr(m.optimizer, cosine_lr(step, self.total_steps, cfg.lr, warmup, cfg.min_lr))
        with _autocast(self.device, cfg.amp):
            logits = m.model.forward_from_taps(taps)
        loss = nn.functional.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)
        value = loss.item()
        if not math.isfinite(value):
            m.failed = f"loss became {value} at epoch {epoch + 1}, step {step + 1}; lower its lr"
            return value
        optimizer_step(m.optimizer, loss, m.model, cfg.grad_clip)
        return value

    def fit(self) -> dict[str, dict[str, Any]]:
        with flushed_denormals(self.cfg.flush_denormal, self.device) as self.denormals:
            return self._fit()

    def _fit(self) -> dict[str, dict[str, Any]]:
        cfg = self.cfg
        seconds = []
        for epoch in range(cfg.epochs):
            self.sampler.set_epoch(epoch)
            for m in self.members:
                m.model.train()
            sums = {m.name: 0.0 for m in self.members}
            n, t0 = 0, time.perf_counter()
            bar = tqdm(
                self.loader, desc=f"sweep epoch {epoch + 1}/{cfg.epochs}", disable=not cfg.progress, leave=False
            )
            for i, (inputs, labels) in enumerate(bar):
                inputs, labels = to_device(inputs, self.device), labels.to(self.device)
                with _autocast(self.device, cfg.amp):
                    taps = self.shared(inputs)
                for m in self.members:
                    if m.failed is None:
                        sums[m.name] += self._step(m, taps, labels, epoch * self.steps_per_epoch + i, epoch) * len(
                            labels
                        )
                n += len(labels)
            seconds.append(time.perf_counter() - t0)
            for m in self.members:
                m.history.append(
                    {
                        "epoch": epoch,
                        "train_loss": sums[m.name] / max(1, n),
                        "seconds": seconds[-1],
                        "samples_per_second": len(self.train_set) / seconds[-1],
                    }
                )
            if cfg.select_on_val:
                for name, res in self._evaluate("val", "val").items():
                    m = next(m for m in self.members if m.name == name)
                    m.history[-1]["val_accuracy"] = res["accuracy"]
                    if res["accuracy"] > m.best["val_accuracy"]:
                        m.best = {"val_accuracy": res["accuracy"], "epoch": epoch}
                        m.best_state = m.trainable_state()
        return self._finish(seconds)

    def _finish(self, seconds: list[float]) -> dict[str, dict[str, Any]]:
        for m in self.members:
            if m.best_state is not None and m.failed is None:
                params = dict(m.model.named_parameters())
                with torch.no_grad():
                    for k, v in m.best_state.items():
                        params[k].copy_(v)
        test = self._evaluate("test", "test")
        per_epoch = sum(seconds) / max(1, len(seconds))
        out = {}
        for m in self.members:
            fit: dict[str, Any] = {
                "history": m.history,
                "epochs_run_this_session": len(seconds),
                "malloc": self.malloc,
                "denormals": self.denormals,
            }
            if m.name in test:
                t = test[m.name]
                fit.update(test_accuracy=t["accuracy"], test_loss=t["loss"], test_samples=t["samples"])
            if self.cfg.select_on_val:
                fit.update(selected_epoch=m.best["epoch"], val_accuracy=m.best["val_accuracy"])
            fit.update(
                seconds_per_epoch=per_epoch,
                samples_per_second=len(self.train_set) / max(1e-9, per_epoch),
                train_samples=len(self.train_set),
                sweep_members=len(self.members),
            )
            out[m.name] = fit
        return out


def build_members(
    backbone: Backbone,
    num_classes: int,
    method: str,
    sweep: dict[str, list[str]],
    overrides: dict[str, Any],
    train: TrainConfig,
) -> list[Member]:
    """One Member per grid point; each model is built right after `torch.manual_seed(train.seed)`, as in
    run_training, so a member starts from the same weights as its separate run."""
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
        model = get_tuned_model(backbone, make_config(method, {**overrides, **method_values}), num_classes)
        require_side(model, "share a backbone pass in a sweep")
        members.append(Member(member_name(values), values, replace(train, **train_values), model))
    return members


def run_sweep(
    *,
    backbone: str,
    data: str,
    method: str,
    sweep: dict[str, list[str]],
    overrides: dict[str, Any] | None = None,
    train: TrainConfig | None = None,
    output_dir: str | None = None,
    cache: str | None = None,
    checkpoint: str | None = None,
    pretrained: bool | None = None,
    max_length: int | None = None,
    image_size: int | None = None,
    test_size: int | None = None,
    split_seed: int | None = None,
    overwrite: bool = False,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train every configuration of `sweep` together; returns {'members': [...], 'selected': name | None}."""
    train = train or TrainConfig()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("sweeps run in one process; launch without torchrun (members already share the batches)")
    bb = load_backbone(
        backbone, checkpoint=checkpoint, pretrained=pretrained, max_length=max_length, image_size=image_size
    )
    task = load_data(data, bb.preprocess, seed=train.seed if split_seed is None else split_seed, test_size=test_size)
    members = build_members(bb, task.num_classes, method, sweep, dict(overrides or {}), train)
    dirs = {m.name: os.path.join(output_dir, member_dir(m.values)) if output_dir else None for m in members}
    for d in dirs.values():
        if d and os.path.exists(os.path.join(d, RESULTS_NAME)) and not overwrite:
            raise ResultsExistError(f"{d}/{RESULTS_NAME} exists; pass --overwrite or pick another --output")
    if cache:
        task = use_feature_cache([m.model for m in members], task, cache, train)
    trainer = SweepTrainer(members, task, train, reads_taps=bool(cache))
    steps = {}
    for m in members:  # bytes saved for backward on the first batch, as run_training records
        torch.manual_seed(train.seed)
        steps[m.name] = measure_step(m.model, task, m.train, trainer, {}, peak_memory=False)
    t0 = time.perf_counter()
    fits = trainer.fit()
    seconds = time.perf_counter() - t0
    rows = []
    for m in members:
        info = {"sweep": {"name": m.name, "values": m.values, "members": len(members)}, **(extra or {})}
        if m.failed is None:
            finish_run(m.model, task, m.train, fits[m.name], steps[m.name], trainer.device, dirs[m.name], False, info)
        elif dirs[m.name]:
            write_json(os.path.join(dirs[m.name], RESULTS_NAME), {"status": "failed", "error": m.failed, **info})
        rows.append({"name": m.name, **m.values, "dir": dirs[m.name], "status": m.failed or "complete"})
        rows[-1].update({k: fits[m.name].get(k) for k in ("val_accuracy", "selected_epoch", "test_accuracy")})
    summary = summarize(rows, list(sweep), train.select_on_val, seconds)
    if output_dir:
        write_json(os.path.join(output_dir, "sweep.json"), summary)
        write_text(os.path.join(output_dir, "summary.md"), summary["table"] + "\n")
    return summary


def summarize(rows: list[dict[str, Any]], keys: list[str], select_on_val: bool, seconds: float) -> dict[str, Any]:
    """Pick the best member on val accuracy (never test); a Markdown table of every member."""
    ok = [r for r in rows if r["status"] == "complete" and r.get("val_accuracy") is not None]
    selected = max(ok, key=lambda r: r["val_accuracy"])["name"] if select_on_val and ok else None
    cols = [*keys, "val_accuracy", "selected_epoch", "test_accuracy", "status"]

    def fmt(v: Any) -> str:
        return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join([*cols, "selected"]) + " |", "|" + "---|" * (len(cols) + 1)]
    for r in rows:
        lines.append("| " + " | ".join([*(fmt(r.get(c)) for c in cols), "*" if r["name"] == selected else ""]) + " |")
    note = (
        "selection: best val accuracy (val split), never test"
        if select_on_val
        else "no selection: train with --select-on-val to pick a configuration on the val split"
    )
    return {"members": rows, "selected": selected, "selection": note, "seconds": seconds, "table": "\n".join(lines)}
