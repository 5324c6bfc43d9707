"""The one training loop. It knows `TunedModel` and `TaskData`, not methods.

AdamW (no decay on biases/norms), per-step cosine schedule with linear warm-up, gradient clipping, AMP on CUDA,
seeded batches, a progress bar, a checkpoint written atomically after every epoch, exact `resume`, data
parallel under torchrun, and one evaluation on test at the end (selection, if asked, only on val).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import BatchSampler, SequentialSampler
from tqdm.auto import tqdm

from thrifty.data.base import LabelledDataset, TaskData, batch_loader
from thrifty.errors import ConfigError, NonFiniteLossError, ResultsExistError
from thrifty.train.allocator import MALLOC_MODES, tune_malloc
from thrifty.train.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from thrifty.train.denormals import flushed_denormals
from thrifty.train.distributed import DistInfo, barrier, broadcast_flag, init_distributed
from thrifty.train.optim import build_optimizer, cosine_lr, set_lr
from thrifty.train.sampler import GlobalBatchSampler


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    min_lr: float = 1e-6
    grad_clip: float | None = 1.0
    label_smoothing: float = 0.0
    seed: int = 0
    amp: bool = True  # CUDA only (bf16 autocast); ignored on CPU
    device: str = "auto"
    eval_batch_size: int | None = None
    num_workers: int = 0
    select_on_val: bool = False  # train on the tuning split, keep the best epoch on val, then test it
    progress: bool = True
    malloc: str = "tuned"  # CPU: keep freed large blocks for reuse (thrifty.train.allocator); "system": leave it
    flush_denormal: bool = True  # CPU: subnormal floats read as 0 on every thread during fit (train.denormals)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"`{name}` must be positive, got {getattr(self, name)!r}")
        if self.lr <= 0:
            raise ConfigError(f"`lr` must be positive, got {self.lr!r}")
        if self.malloc not in MALLOC_MODES:
            raise ConfigError(f"`malloc` must be one of {MALLOC_MODES}, got {self.malloc!r}")


def apply_malloc(config: TrainConfig, device: torch.device) -> str:
    """`config.malloc` applied on CPU (thrifty.train.allocator); returns what is in effect ('system' on CUDA)."""
    return tune_malloc(config.malloc) if device.type == "cpu" else "system"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def to_device(inputs: Any, device: torch.device) -> Any:
    if isinstance(inputs, dict):
        return {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
    return inputs.to(device, non_blocking=True)


def _autocast(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: LabelledDataset,
    batch_size: int = 64,
    device: torch.device | None = None,
    amp: bool = False,
    progress: bool = False,
    desc: str = "eval",
) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy of `model` on `dataset`."""
    return evaluate_many({"model": model}, dataset, batch_size, device, amp, progress, desc)["model"]


@torch.no_grad()
def evaluate_many(
    models: dict[str, nn.Module],
    dataset: LabelledDataset,
    batch_size: int = 64,
    device: torch.device | None = None,
    amp: bool = False,
    progress: bool = False,
    desc: str = "eval",
    prepare: Callable[[Any], Any] | None = None,
    forward: Callable[[nn.Module, Any], torch.Tensor] | None = None,
) -> dict[str, dict[str, float]]:
    """`evaluate` for several models in one pass over `dataset`: `prepare(inputs)` runs once per batch (e.g. a
    frozen backbone shared by side networks), then `forward(model, prepared)` (default `model(prepared)`) each."""
    device = device or next(next(iter(models.values())).parameters()).device
    was_training = {k: m.training for k, m in models.items()}
    for m in models.values():
        m.eval()
    loader = batch_loader(dataset, BatchSampler(SequentialSampler(range(len(dataset))), batch_size, drop_last=False))
    sums = {k: [0, 0.0] for k in models}  # correct, loss sum
    total = 0
    for inputs, labels in tqdm(loader, desc=desc, disable=not progress, leave=False):
        inputs, labels = to_device(inputs, device), labels.to(device)
        with _autocast(device, amp):
            shared = prepare(inputs) if prepare is not None else inputs
            outs = {k: (forward(m, shared) if forward is not None else m(shared)).float() for k, m in models.items()}
        for k, logits in outs.items():
            sums[k][0] += int((logits.argmax(-1) == labels).sum())
            sums[k][1] += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
        total += len(labels)
    for k, m in models.items():
        m.train(was_training[k])
    n = max(1, total)
    return {k: {"accuracy": c / n, "loss": loss / n, "samples": total} for k, (c, loss) in sums.items()}


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, model: nn.Module, grad_clip: float | None):
    """zero_grad, backward, clip the trainable gradients to `grad_clip` (if set), step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    optimizer.step()


class Trainer:
    """`Trainer(model, task, config, output_dir).fit(resume=False)` -> results dict (also in results.json)."""

    def __init__(self, model, task: TaskData, config: TrainConfig, output_dir: str | None = None):
        self.model, self.task, self.cfg, self.output_dir = model, task, config, output_dir
        self.device = resolve_device(config.device)
        self.malloc = apply_malloc(config, self.device)
        self.denormals: str | None = None  # set by fit (thrifty.train.denormals)
        self.dist: DistInfo = init_distributed(self.device)
        torch.manual_seed(config.seed)
        self.model.to(self.device)
        self.train_set = task.split("tune_train" if config.select_on_val else "train")
        self.sampler = GlobalBatchSampler(
            len(self.train_set), config.batch_size, config.seed, rank=self.dist.rank, world_size=self.dist.world_size
        )
        self.loader = batch_loader(self.train_set, self.sampler, config.num_workers)
        self.optimizer = build_optimizer(model, config.lr, config.weight_decay)
        self.steps_per_epoch = len(self.sampler)
        self.total_steps = self.steps_per_epoch * config.epochs
        self.warmup_steps = round(config.warmup_epochs * self.steps_per_epoch)
        self.ddp = self._wrap_ddp()
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {"val_accuracy": -1.0, "epoch": None}
        self.best_state: dict[str, torch.Tensor] | None = None
        self.start_epoch = 0

    def _wrap_ddp(self) -> nn.Module:
        if not self.dist.enabled:
            return self.model
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(self.model, device_ids=ids)

    # --- checkpoints -----------------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> str | None:
        return os.path.join(self.output_dir, CHECKPOINT_NAME) if self.output_dir else None

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        """Copies of what training changes: trainable parameters and, for models whose backbone statistics train
        (BatchNorm in full fine-tuning), those buffers (`TunedModel._saved_tensors`)."""
        live = self._live_state()
        return {n: t.detach().to("cpu", copy=True) for n, t in live.items()}

    def _live_state(self) -> dict[str, torch.Tensor]:
        if hasattr(self.model, "_saved_tensors"):
            return self.model._saved_tensors()
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        live = self._live_state()
        with torch.no_grad():
            for k, v in state.items():
                live[k].copy_(v)

    def _save(self, epoch: int) -> None:
        if not (self.checkpoint_path and self.dist.is_main):
            return
        extra = {f"best.{k}": v for k, v in (self.best_state or {}).items()}
        save_checkpoint(
            self.checkpoint_path,
            model_state=self._trainable_state(),
            optimizer=self.optimizer,
            state={"epoch": epoch, "history": self.history, "best": self.best, "train_config": asdict(self.cfg)},
            extra=extra,
        )

    def _restore(self) -> None:
        ck = load_checkpoint(self.checkpoint_path)
        self._load_state(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        torch.set_rng_state(ck["rng"])
        self.history = ck["state"]["history"]
        self.best = ck["state"]["best"]
        best = {k[5:]: v for k, v in ck["extra"].items() if k.startswith("best.")}
        self.best_state = best or None
        self.start_epoch = ck["state"]["epoch"] + 1

    def _check_outputs(self, resume: bool, overwrite: bool) -> None:
        if not self.output_dir:
            return
        results = os.path.join(self.output_dir, "results.json")
        if os.path.exists(results) and not overwrite:
            raise ResultsExistError(f"{results} exists; pass --overwrite to replace it or pick another --output")
        if os.path.exists(self.checkpoint_path) and not (resume or overwrite):
            raise ResultsExistError(
                f"{self.checkpoint_path} exists from an unfinished run; pass --resume to continue "
                "it or --overwrite to start over"
            )

    # --- training --------------------------------------------------------------------------------------------
    def fit(self, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
        with flushed_denormals(self.cfg.flush_denormal, self.device) as self.denormals:
            return self._fit(resume, overwrite)

    def _fit(self, resume: bool, overwrite: bool) -> dict[str, Any]:
        self._check_outputs(resume, overwrite)
        if resume and self.checkpoint_path and os.path.exists(self.checkpoint_path):
            self._restore()
        cfg = self.cfg
        epoch_times = []
        for epoch in range(self.start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            train_loss = self._train_epoch(epoch)
            seconds = time.perf_counter() - t0
            epoch_times.append(seconds)
            record = {
                "epoch": epoch,
                "train_loss": train_loss,
                "seconds": seconds,
                "samples_per_second": len(self.train_set) / seconds,
            }
            if cfg.select_on_val and self.dist.is_main:
                val = evaluate(self.model, self.task.split("val"), self._eval_bs(), self.device, cfg.amp)
                record["val_accuracy"] = val["accuracy"]
                if val["accuracy"] > self.best["val_accuracy"]:
                    self.best = {"val_accuracy": val["accuracy"], "epoch": epoch}
                    self.best_state = self._trainable_state()
            self.history.append(record)
            self._save(epoch)
            if self.dist.is_main:
                val = f", val acc {record['val_accuracy']:.4f}" if "val_accuracy" in record else ""
                tqdm.write(f"epoch {epoch + 1}/{cfg.epochs}: train loss {train_loss:.4f}{val}, {seconds:.1f} s")
            barrier(self.dist)
        return self._finish(epoch_times)

    def _eval_bs(self) -> int:
        return self.cfg.eval_batch_size or max(self.cfg.batch_size, 64)

    def _train_epoch(self, epoch: int) -> float:
        cfg, model = self.cfg, self.ddp
        self.sampler.set_epoch(epoch)
        self.model.train()
        loss_sum, n = 0.0, 0
        bar = tqdm(
            self.loader,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            disable=not (cfg.progress and self.dist.is_main),
            leave=False,
        )
        for i, (inputs, labels) in enumerate(bar):
            step = epoch * self.steps_per_epoch + i
            set_lr(self.optimizer, cosine_lr(step, self.total_steps, cfg.lr, self.warmup_steps, cfg.min_lr))
            inputs, labels = to_device(inputs, self.device), labels.to(self.device)
            with _autocast(self.device, cfg.amp):
                logits = model(inputs)
            loss = nn.functional.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)
            if broadcast_flag(self.dist, not math.isfinite(loss.item())):
                last = f"{self.checkpoint_path} (epoch {epoch})" if self.checkpoint_path and epoch else "none yet"
                raise NonFiniteLossError(
                    f"loss became {loss.item()} at epoch {epoch + 1}, step {i + 1}; training "
                    f"stopped. Last good checkpoint: {last}. Lower --lr, keep grad clipping "
                    "on, or check the inputs for NaN/inf."
                )
            optimizer_step(self.optimizer, loss, self.model, cfg.grad_clip)
            loss_sum += loss.item() * len(labels)
            n += len(labels)
            bar.set_postfix(loss=f"{loss_sum / n:.4f}")
        return loss_sum / max(1, n)

    def _finish(self, epoch_times: list[float]) -> dict[str, Any]:
        cfg = self.cfg
        if cfg.select_on_val and self.best_state is not None:
            self._load_state(self.best_state)
        out: dict[str, Any] = {
            "history": self.history,
            "epochs_run_this_session": len(epoch_times),
            "malloc": self.malloc,
            "denormals": self.denormals,
        }
        if self.dist.is_main:
            test = evaluate(
                self.model,
                self.task.split("test"),
                self._eval_bs(),
                self.device,
                cfg.amp,
                progress=cfg.progress,
                desc="test",
            )
            out.update(test_accuracy=test["accuracy"], test_loss=test["loss"], test_samples=test["samples"])
            if cfg.select_on_val:
                out.update(selected_epoch=self.best["epoch"], val_accuracy=self.best["val_accuracy"])
        secs = [h["seconds"] for h in self.history]
        out["seconds_per_epoch"] = sum(secs) / max(1, len(secs))
        out["samples_per_second"] = len(self.train_set) / max(1e-9, out["seconds_per_epoch"])
        out["train_samples"] = len(self.train_set)
        barrier(self.dist)
        return out
