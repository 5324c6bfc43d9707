"""`run_training`: spec strings in, a trained adapter and one `results.json` out. The CLI, the demo and the
benchmark harness all call it, so every run records the same keys."""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import torch

from thrifty.backbones import load_backbone
from thrifty.data import TaskData, load_data
from thrifty.errors import ConfigError
from thrifty.io import write_json
from thrifty.metrics import dir_bytes, environment, peak_step_memory_subprocess, saved_activation_bytes
from thrifty.metrics.memory import cuda_peak_step_bytes, training_step
from thrifty.train.checkpoint import CHECKPOINT_NAME
from thrifty.train.loop import TrainConfig, Trainer, resolve_device, to_device
from thrifty.tuners import TunedModel, get_method, get_tuned_model, make_config


if TYPE_CHECKING:
    from thrifty.serve.client import RemoteFeatures


RESULTS_NAME = "results.json"


def measure_step(
    model, task, cfg: TrainConfig, trainer: Trainer, spec: dict[str, Any], peak_memory: bool
) -> dict[str, Any]:
    """Bytes saved for backward on the first real training batch, and the peak memory of one step."""
    first = next(iter(trainer.sampler))
    batch = [trainer.train_set[i] for i in first]
    inputs, labels = torch.utils.data.default_collate(batch)
    inputs, labels = to_device(inputs, trainer.device), labels.to(trainer.device)
    model.train()
    saved = saved_activation_bytes(model, lambda: training_step(model, inputs, labels, None))
    model.zero_grad(set_to_none=True)
    out: dict[str, Any] = {"saved_activation_bytes": saved, "measured_batch_size": len(first)}
    if not peak_memory:
        return out
    if trainer.device.type == "cuda":
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)
        out.update(
            peak_memory_bytes=cuda_peak_step_bytes(model, inputs, labels, opt),
            peak_memory_kind="cuda_max_memory_allocated",
        )
        model.zero_grad(set_to_none=True)
    else:
        res = peak_step_memory_subprocess(
            {**spec, "batch_size": len(first), "timed_steps": 0, "threads": torch.get_num_threads()}
        )
        out.update(peak_memory_bytes=res["peak_memory_bytes"], peak_memory_kind="cpu_rss_growth_fresh_process")
    return out


def run_training(
    *,
    backbone: str,
    data: str,
    method: str,
    overrides: dict[str, Any] | None = None,
    train: TrainConfig | None = None,
    output_dir: str | None = None,
    checkpoint: str | None = None,
    pretrained: bool | None = None,
    max_length: int | None = None,
    image_size: int | None = None,
    test_size: int | None = None,
    split_seed: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    peak_memory: bool = True,
    keep_checkpoint: bool = False,
    extra: dict[str, Any] | None = None,
    cache: str | None = None,
    remote: str | None = None,
    token_file: str | None = None,
) -> dict[str, Any]:
    """Train `method` on `data` over `backbone`; save the adapter and results.json in `output_dir`.

    `cache`: a feature-cache directory (thrifty.features); a side method then trains from the cached taps
    (the directory is created or completed first), which gives the same result as training on the inputs.
    `remote`: URL of a feature server (`thrifty serve`, bearer token in `token_file`): the backbone runs there,
    its gathered features fill the cache (default `output_dir/features`) and only the edge network runs here."""
    train = train or TrainConfig()
    overrides = dict(overrides or {})
    link = connect_remote(remote, token_file, backbone, checkpoint, pretrained, image_size, max_length)
    if link is not None:
        bb = link.backbone
        overrides = {**link.method_defaults(get_method(method)[0]), **overrides}
        cache = cache or (os.path.join(output_dir, "features") if output_dir else None)
        if not cache:
            raise ConfigError("training from a feature server needs --cache DIR or --output")
    else:
        bb = load_backbone(
            backbone, checkpoint=checkpoint, pretrained=pretrained, max_length=max_length, image_size=image_size
        )
    task = load_data(data, bb.preprocess, seed=train.seed if split_seed is None else split_seed, test_size=test_size)
    torch.manual_seed(train.seed)
    model = get_tuned_model(bb, make_config(method, overrides), task.num_classes)
    if cache:
        task = use_feature_cache([model], task, cache, train, link)
    trainer = Trainer(model, task, train, output_dir)
    trainer._check_outputs(resume, overwrite)
    spec = {
        "backbone": backbone,
        "method": method,
        "overrides": overrides,
        "num_classes": task.num_classes,
        "max_length": max_length,
        "image_size": image_size,
        "seed": train.seed,
    }
    # the fresh-process peak-memory worker feeds backbone inputs, so it does not describe a run on cached taps
    step = measure_step(model, task, train, trainer, spec, peak_memory and trainer.dist.is_main and not cache)
    if link is not None:
        step.update(link.metrics())  # bytes received from the server, in total and per sample
    fit = trainer.fit(resume=resume, overwrite=overwrite)
    if not trainer.dist.is_main:
        return fit
    return finish_run(model, task, train, fit, step, trainer.device, output_dir, keep_checkpoint, extra)


def require_side(model: TunedModel, purpose: str) -> None:
    """Raise ConfigError unless `model` is a side method (reads only the frozen backbone's outputs)."""
    from thrifty.tuners import available_methods, get_method
    from thrifty.tuners.side import SideTuner

    if not isinstance(model, SideTuner):
        side = [m for m in available_methods() if issubclass(get_method(m)[1], SideTuner)]
        raise ConfigError(
            f"method {model.config.method!r} cannot {purpose}: it runs inside the backbone (adapts it or adds "
            f"back into it). Methods that can: {', '.join(side)}"
        )


def connect_remote(
    remote: str | None,
    token_file: str | None,
    backbone: str | None,
    checkpoint: str | None,
    pretrained: bool | None,
    image_size: int | None,
    max_length: int | None,
) -> RemoteFeatures | None:
    """A `RemoteFeatures` link to the feature server at `remote` (None without one); the backbone flags must
    agree with what the server runs (thrifty.serve.client.RemoteFeatures.connect)."""
    if remote is None:
        if token_file:
            raise ConfigError("--token-file is for --remote (a feature server); pass both or neither")
        return None
    if checkpoint or pretrained is False:
        raise ConfigError("with --remote the server owns the backbone weights; drop --checkpoint / --random-init")
    from thrifty.serve.client import RemoteFeatures

    return RemoteFeatures.connect(remote, token_file, backbone=backbone, image_size=image_size, max_length=max_length)


def use_feature_cache(
    models: list[TunedModel], task: TaskData, cache: str, train: TrainConfig, remote: RemoteFeatures | None = None
) -> TaskData:
    """The task's splits replaced by the cached taps the side `models` read (extracting what is missing, from
    the `remote` feature server if given); the models are switched to read taps. Only side methods qualify:
    the others need the backbone's inside."""
    from thrifty.features import cached_task, roles_for

    for model in models:
        require_side(model, "train from a feature cache")
    taps = sorted({t for model in models for t in model.tap_names()})
    device = resolve_device(train.device)
    # on CPU, widen a float16 cache to the head's dtype in the one copy out of the map; on CUDA copy float16 over
    float_dtype = next(models[0].head.parameters()).dtype if device.type == "cpu" else None
    source = {}
    if remote is not None:
        remote.check_taps(taps)
        source = {"batches": remote.batches, "dtype": remote.dtype}
    out = cached_task(
        cache,
        models[0].backbone,
        task,
        taps,
        roles=roles_for(train.select_on_val),
        extract=int(os.environ.get("WORLD_SIZE", "1")) <= 1,  # torchrun ranks only read (thrifty extract first)
        batch_size=train.eval_batch_size or max(train.batch_size, 64),
        device=device,
        amp=train.amp,
        progress=train.progress,
        float_dtype=float_dtype,
        flush_denormal=train.flush_denormal,
        **source,
    )
    for model in models:
        model.read_taps_(True)
    return out


def finish_run(
    model: TunedModel,
    task: TaskData,
    train: TrainConfig,
    fit: dict[str, Any],
    step: dict[str, Any],
    device: torch.device,
    output_dir: str | None,
    keep_checkpoint: bool,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Save the adapter and write results.json (the keys every run records)."""
    bb = model.backbone
    results: dict[str, Any] = {
        "status": "complete",
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "backbone": bb.describe(),
        "task": task.describe(),
        "method": model.describe(),
        "train": asdict(train),
        "seed": train.seed,
        "history": fit.pop("history"),
        "env": {**environment(device), "malloc": fit.pop("malloc", None), "denormals": fit.pop("denormals", None)},
        "extra": extra or {},
    }
    metrics = {
        **fit,
        **step,
        "trainable_params": model.num_trainable(),
        "adapter_params": model.num_trainable(include_head=False),
    }
    if output_dir:
        model.save_pretrained(output_dir)
        metrics["adapter_bytes"] = dir_bytes(output_dir)
        if not keep_checkpoint and os.path.exists(os.path.join(output_dir, CHECKPOINT_NAME)):
            os.remove(os.path.join(output_dir, CHECKPOINT_NAME))
    results["metrics"] = metrics
    if output_dir:
        write_json(os.path.join(output_dir, RESULTS_NAME), results)
    return results
