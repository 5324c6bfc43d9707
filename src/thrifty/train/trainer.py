"""The one training loop. It knows `TunedModel`, `TaskData` and the `Objective`, not methods.

`Trainer` trains N members on one data pass: N = 1 for a normal run (`Trainer(model, task, config, dir)`), N > 1
for a sweep (`Trainer(members, ...)`: side methods sharing each batch's backbone pass or cached taps). AdamW (no
decay on biases/norms), per-step cosine schedule with linear warm-up, gradient clipping, AMP on CUDA, seeded
batches from the objective's sampler, a progress bar, one checkpoint written atomically after every epoch, exact
`resume`, data parallel under torchrun (N = 1), a NaN guard, selection on val by the objective's metric, and one
evaluation on test at the end. Each decision is made here once: which split trains (`TrainConfig.train_role`),
the eval batch size (`TrainConfig.eval_bs`), whether outputs exist (`check_outputs`), whether inputs are taps
(`shared`), the loss (`objective.loss`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from thrifty.data.base import TaskData, batch_loader
from thrifty.errors import ConfigError, NonFiniteLossError, ResultsExistError
from thrifty.features.taps import extract_taps
from thrifty.objectives import Objective
from thrifty.runtime import autocast, flushed_denormals, resolve_device, to_device
from thrifty.train.checkpoint import CHECKPOINT_NAME, load_checkpoint, member_prefix, save_checkpoint
from thrifty.train.config import TrainConfig, apply_malloc
from thrifty.train.distributed import DistInfo, barrier, broadcast_flag, init_distributed
from thrifty.train.evaluate import evaluate_many, objective_of
from thrifty.train.members import Member
from thrifty.train.optim import build_optimizer, cosine_lr, set_lr
from thrifty.tuners.side import require_side


RESULTS_NAME = "results.json"
WARMUP_STEPS = 3  # first steps of a session: allocator, kernels and caches warm up; timed apart from the rest


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, model: nn.Module, grad_clip: float | None):
    """zero_grad, backward, clip the trainable gradients to `grad_clip` (if set), step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    optimizer.step()


class Trainer:
    """`Trainer(model, task, config, output_dir).fit(resume=False)` -> results dict of the run;
    `Trainer([Member, ...], task, config, output_dir).fit()` -> {member name: results dict}."""

    def __init__(
        self,
        models: nn.Module | Sequence[Member],
        task: TaskData,
        config: TrainConfig,
        output_dir: str | None = None,
        *,
        objective: Objective | str | None = None,
        data_parallel: bool = True,
    ):
        self.single = isinstance(models, nn.Module)
        self.members = [Member(models, config, output_dir=output_dir)] if self.single else list(models)
        if not self.members:
            raise ConfigError("the Trainer needs at least one model")
        self.task, self.cfg, self.output_dir = task, config, output_dir
        self.objective = objective_of(self.members[0].model, objective)
        for m in self.members:
            self.objective.check_train(m.train.label_smoothing)
        self.device = resolve_device(config.device)
        self.malloc = apply_malloc(config, self.device)
        self.denormals: str | None = None  # set by fit (thrifty.runtime.denormals)
        # data_parallel=False: under torchrun this process trains alone (e.g. one BTM subset per rank)
        self.dist: DistInfo = init_distributed(self.device) if data_parallel else DistInfo()
        if self.dist.enabled and len(self.members) > 1:
            raise ConfigError("sweeps run in one process; launch without torchrun (members already share batches)")
        self.shared = len(self.members) > 1  # one backbone pass (or cached-tap read) per batch for every member
        if self.shared:
            for m in self.members:
                require_side(m.model, "share a backbone pass in a sweep")
            self.taps = sorted({t for m in self.members for t in m.model.tap_names()})
        torch.manual_seed(config.seed)
        for m in self.members:
            m.model.to(self.device)
            if m.train.lr is None:  # the method's own default (1e-3; full fine-tuning 1e-4)
                m.train = replace(m.train, lr=getattr(getattr(m.model, "config", None), "default_lr", 1e-3))
        self.train_set = task.split(config.train_role)
        self.objective.fit_data(self.train_set.labels, task.num_classes, task.meta)
        self.sampler = self.objective.sampler(
            self.train_set.labels, config.batch_size, config.seed, rank=self.dist.rank, world_size=self.dist.world_size
        )
        self.loader = batch_loader(self.train_set, self.sampler, config.num_workers)
        for m in self.members:
            m.optimizer = build_optimizer(m.model, m.train.lr, m.train.weight_decay, m.train.optimizer)
        self.steps_per_epoch = len(self.sampler)
        self.total_steps = self.steps_per_epoch * config.epochs
        self.ddp = self._wrap_ddp()
        self.start_epoch = 0
        self.steps_run = 0  # this session
        self.warmup: dict[str, float] = {}  # {'steps': W, 'seconds': time of this session's first W steps}

    @property
    def model(self) -> nn.Module:
        return self.members[0].model

    def _wrap_ddp(self) -> nn.Module:
        if not self.dist.enabled:
            return self.model
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(self.model, device_ids=ids)

    # --- inputs and outputs ----------------------------------------------------------------------------------
    def shared_inputs(self, inputs: Any) -> Any:
        """The batch every member reads: the union of their taps, computed once (a cache batch widened once, so
        the members' `float_taps` are no-ops); a single member reads the inputs as they are."""
        if not self.shared:
            return inputs
        first = self.members[0].model
        return first.float_taps(inputs) if first.reads_taps else extract_taps(first.backbone, inputs, self.taps)

    def forward(self, member: Member, batch: Any) -> torch.Tensor:
        return member.model.forward_from_taps(batch) if self.shared else self.ddp(batch)

    def _evaluate(self, role: str, desc: str) -> dict[int, dict[str, float]]:
        live = {str(i): m.model for i, m in enumerate(self.members) if m.failed is None}
        res = evaluate_many(
            live,
            self.task.split(role),
            self.objective,
            self.cfg.eval_bs,
            self.device,
            self.cfg.amp,
            progress=self.cfg.progress and not self.single,
            desc=desc,
            prepare=self.shared_inputs,
            forward=(lambda model, taps: model.forward_from_taps(taps)) if self.shared else None,
        )
        return {int(k): v for k, v in res.items()}

    # --- checkpoints -----------------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> str | None:
        return os.path.join(self.output_dir, CHECKPOINT_NAME) if self.output_dir else None

    def check_outputs(self, resume: bool, overwrite: bool) -> None:
        """Refuse to overwrite finished results, or to restart over an unfinished run's checkpoint silently."""
        for m in self.members:
            results = os.path.join(m.output_dir, RESULTS_NAME) if m.output_dir else None
            if results and os.path.exists(results) and not overwrite:
                raise ResultsExistError(f"{results} exists; pass --overwrite to replace it or pick another --output")
        ck = self.checkpoint_path
        if ck and os.path.exists(ck) and not (resume or overwrite):
            raise ResultsExistError(
                f"{ck} exists from an unfinished run; pass --resume to continue it or --overwrite to start over"
            )

    def _save(self, epoch: int) -> None:
        if not (self.checkpoint_path and self.dist.is_main):
            return
        n, extra = len(self.members), {}
        for i, m in enumerate(self.members):
            extra.update({f"{member_prefix(i, n)}best.{k}": v for k, v in (m.best_state or {}).items()})
        runs = [{"name": m.name, "history": m.history, "best": m.best, "failed": m.failed} for m in self.members]
        save_checkpoint(
            self.checkpoint_path,
            members=[(m.state_copy(), m.optimizer) for m in self.members],
            state={"epoch": epoch, "members": runs, "train_config": asdict(self.cfg)},
            extra=extra,
        )

    def _restore(self) -> None:
        ck = load_checkpoint(self.checkpoint_path)
        if len(ck["members"]) != len(self.members):
            raise ConfigError(
                f"{self.checkpoint_path} holds {len(ck['members'])} members, this run has {len(self.members)}"
            )
        runs = ck["state"].get("members") or [_legacy_run(ck["state"])]
        n = len(self.members)
        for i, (m, saved, run) in enumerate(zip(self.members, ck["members"], runs)):
            m.load_state(saved["model"])
            m.optimizer.load_state_dict(saved["optimizer"])
            m.history, m.best, m.failed = run["history"], run["best"], run.get("failed")
            p = f"{member_prefix(i, n)}best."
            m.best_state = {k[len(p) :]: v for k, v in ck["extra"].items() if k.startswith(p)} or None
        torch.set_rng_state(ck["rng"])
        self.start_epoch = ck["state"]["epoch"] + 1

    # --- training --------------------------------------------------------------------------------------------
    def fit(self, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
        with flushed_denormals(self.cfg.flush_denormal, self.device) as self.denormals:
            return self._fit(resume, overwrite)

    def _fit(self, resume: bool, overwrite: bool) -> dict[str, Any]:
        self.check_outputs(resume, overwrite)
        if resume and self.checkpoint_path and os.path.exists(self.checkpoint_path):
            self._restore()
        epoch_times = []
        for epoch in range(self.start_epoch, self.cfg.epochs):
            t0 = time.perf_counter()
            losses = self._train_epoch(epoch)
            seconds = time.perf_counter() - t0
            epoch_times.append(seconds)
            for m, loss in zip(self.members, losses):
                m.history.append(
                    {
                        "epoch": epoch,
                        "train_loss": loss,
                        "seconds": seconds,
                        "samples_per_second": len(self.train_set) / seconds,
                    }
                )
            if self.cfg.select_on_val and self.dist.is_main:
                self._select(epoch)
            self._save(epoch)
            if self.dist.is_main:
                self._log(epoch, seconds)
            barrier(self.dist)
        return self._finish(epoch_times)

    def _train_epoch(self, epoch: int) -> list[float]:
        """One pass over the training batches; the mean training loss of each member."""
        cfg = self.cfg
        self.sampler.set_epoch(epoch)
        for m in self.members:
            m.model.train()
        sums, n = [0.0] * len(self.members), 0
        desc = f"{'sweep ' if self.shared else ''}epoch {epoch + 1}/{cfg.epochs}"
        bar = tqdm(self.loader, desc=desc, disable=not (cfg.progress and self.dist.is_main), leave=False)
        t0 = time.perf_counter()
        for i, (inputs, labels) in enumerate(bar):
            inputs, labels = to_device(inputs, self.device), labels.to(self.device)
            targets = self.objective.targets(inputs, labels)
            inputs, targets = self.objective.training_batch(inputs, targets, (cfg.seed, epoch, i))
            with autocast(self.device, cfg.amp):
                batch = self.shared_inputs(inputs)
            for k, m in enumerate(self.members):
                if m.failed is None:
                    sums[k] += self._step(m, batch, targets, epoch, i) * len(labels)
            n += len(labels)
            if self.single:
                bar.set_postfix(loss=f"{sums[0] / n:.4f}")
            self._time_steps(epoch, i, time.perf_counter() - t0)
        return [s / max(1, n) for s in sums]

    def _time_steps(self, epoch: int, i: int, elapsed: float) -> None:
        """Times this session's first WARMUP_STEPS steps apart, and after as many steady steps again prints an
        estimate of the whole run (steady seconds per step x steps left)."""
        self.steps_run += 1
        if epoch != self.start_epoch:
            return
        w = min(WARMUP_STEPS, max(1, self.steps_per_epoch // 2))
        if i + 1 == w:
            self.warmup = {"steps": w, "seconds": elapsed}
        elif i + 1 == 2 * w and self.warmup and self.dist.is_main and self.cfg.progress:
            per_step = (elapsed - self.warmup["seconds"]) / w
            left = (self.cfg.epochs - self.start_epoch) * self.steps_per_epoch - (i + 1)
            total = elapsed + per_step * left
            tqdm.write(
                f"estimate: {per_step:.2f} s per step after a {w}-step warm-up ({self.warmup['seconds']:.1f} s); "
                f"about {_duration(total)} of training for {self.cfg.epochs - self.start_epoch} epoch(s)"
            )

    def _step(self, m: Member, batch: Any, targets: torch.Tensor, epoch: int, i: int) -> float:
        cfg = m.train
        warmup = round(cfg.warmup_epochs * self.steps_per_epoch)
        step = epoch * self.steps_per_epoch + i
        set_lr(m.optimizer, cosine_lr(step, self.total_steps, cfg.lr, warmup, cfg.min_lr))
        with autocast(self.device, cfg.amp):
            outputs = self.forward(m, batch)
        loss = self.objective.loss(outputs, targets, cfg.label_smoothing)
        value = loss.item()
        if broadcast_flag(self.dist, not math.isfinite(value)):
            self._fail(m, f"loss became {value} at epoch {epoch + 1}, step {i + 1}", epoch)
            return value
        optimizer_step(m.optimizer, loss, m.model, cfg.grad_clip)
        return value

    def _fail(self, m: Member, why: str, epoch: int) -> None:
        """The NaN guard: the member stops; when no member is left, the run stops with a NonFiniteLossError."""
        m.failed = f"{why}; lower its lr"
        if all(x.failed for x in self.members):
            last = f"{self.checkpoint_path} (epoch {epoch})" if self.checkpoint_path and epoch else "none yet"
            raise NonFiniteLossError(
                f"{why}; training stopped. Last good checkpoint: {last}. Lower --lr, keep grad clipping on, "
                "or check the inputs for NaN/inf."
            )

    def _select(self, epoch: int) -> None:
        """Evaluate on val; keep each member's best epoch by the objective's selection metric (never test)."""
        key = self.objective.selection_metric
        for i, res in self._evaluate("val", "val").items():
            m = self.members[i]
            m.history[-1].update({f"val_{k}": res[k] for k in self.objective.metric_names})
            if self.objective.better(res[key], m.best["value"]):
                m.best = {"epoch": epoch, "value": res[key]}
                m.best_state = m.state_copy()

    def _log(self, epoch: int, seconds: float) -> None:
        key = f"val_{self.objective.selection_metric}"
        for m in self.members:
            h = m.history[-1]
            val = f", {key.replace('_', ' ')} {h[key]:.4f}" if key in h else ""
            who = f"{m.name}: " if m.name else ""
            status = f" ({m.failed})" if m.failed else ""
            tqdm.write(
                f"{who}epoch {epoch + 1}/{self.cfg.epochs}: train loss {h['train_loss']:.4f}{val}, {seconds:.1f} s"
                f"{status}"
            )

    def _timing(self, m: Member, epochs_this_session: int) -> dict[str, Any]:
        """`seconds_per_epoch` without the warm-up: this session's epochs minus its first WARMUP_STEPS steps,
        per steady step, times the steps of an epoch (the mean of the recorded epochs when nothing ran now)."""
        secs = [h["seconds"] for h in m.history]
        session = secs[len(secs) - epochs_this_session :] if epochs_this_session else []
        steady_steps = self.steps_run - self.warmup.get("steps", 0)
        if session and self.warmup and steady_steps > 0:
            per_step = (sum(session) - self.warmup["seconds"]) / steady_steps
            return {
                "seconds_per_epoch": per_step * self.steps_per_epoch,
                "warmup_steps": self.warmup["steps"],
                "warmup_seconds": self.warmup["seconds"],
            }
        return {"seconds_per_epoch": sum(secs) / max(1, len(secs))}

    def _finish(self, epoch_times: list[float]) -> dict[str, Any]:
        for m in self.members:
            if self.cfg.select_on_val and m.best_state is not None and m.failed is None:
                m.load_state(m.best_state)
        test = self._evaluate("test", "test") if self.dist.is_main else {}
        outs = []
        for i, m in enumerate(self.members):
            out: dict[str, Any] = {
                "history": m.history,
                "epochs_run_this_session": len(epoch_times),
                "malloc": self.malloc,
                "denormals": self.denormals,
            }
            if m.failed:
                out["failed"] = m.failed
            out.update({f"test_{k}": v for k, v in test.get(i, {}).items()})
            if self.cfg.select_on_val and self.dist.is_main:
                out.update(selected_epoch=m.best["epoch"])
                out[f"val_{self.objective.selection_metric}"] = m.best["value"]
            out.update(self._timing(m, len(epoch_times)))
            out["samples_per_second"] = len(self.train_set) / max(1e-9, out["seconds_per_epoch"])
            out["train_samples"] = len(self.train_set)
            out.update(
                world_size=self.dist.world_size,
                global_batch_size=self.cfg.batch_size,
                per_rank_batch_size=-(-self.cfg.batch_size // self.dist.world_size),
            )
            if not self.single:
                out["sweep_members"] = len(self.members)
            outs.append(out)
        barrier(self.dist)
        return outs[0] if self.single else {m.name: o for m, o in zip(self.members, outs)}


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _legacy_run(state: dict[str, Any]) -> dict[str, Any]:
    """A single-member checkpoint written before runs recorded members ({'history', 'best': {'val_accuracy'}})."""
    best = state.get("best") or {}
    value = best.get("val_accuracy")
    return {
        "history": state["history"],
        "best": {"epoch": best.get("epoch"), "value": None if value in (None, -1.0) else value},
    }
