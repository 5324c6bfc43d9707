"""`run_training`: spec strings (or a loaded backbone) in, trained adapters and `results.json` out. The CLI, the
demo and the benchmark harness all call it, so every run records the same keys. With `sweep`, every
configuration of the grid trains together as one Trainer's members (one backbone pass per batch)."""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import time
from dataclasses import asdict
from typing import Any

import torch

from thrifty.backbones import Backbone, BackboneSpec, load_backbone
from thrifty.backbones.remote import RemoteBackbone
from thrifty.data import TaskData, load_data
from thrifty.errors import ConfigError
from thrifty.features.remote import RemoteFeatures
from thrifty.io import write_json, write_text
from thrifty.metrics import dir_bytes, environment
from thrifty.objectives import Objective, make_objective
from thrifty.runtime import resolve_device
from thrifty.train.checkpoint import CHECKPOINT_NAME
from thrifty.train.config import TrainConfig
from thrifty.train.measure import measure_step
from thrifty.train.members import Member, build_members, summarize
from thrifty.train.trainer import RESULTS_NAME, Trainer
from thrifty.tuners import TunedModel, get_method, get_tuned_model, make_config
from thrifty.tuners.side import require_side


def run_training(
    *,
    backbone: str | BackboneSpec | Backbone,
    data: str | TaskData,
    method: str,
    overrides: dict[str, Any] | None = None,
    train: TrainConfig | None = None,
    output_dir: str | None = None,
    objective: str | Objective | None = None,
    sweep: dict[str, list[str]] | None = None,
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
    keep_features: bool = False,
    disk_check: bool = True,
) -> dict[str, Any]:
    """Train `method` on `data` over `backbone`; save the adapter and results.json in `output_dir`.

    `backbone`: a spec string, a BackboneSpec (checkpoint, random init, input size) or a loaded Backbone (used as
    it is, e.g. `load_backbone("minilm", max_length=64)`). `data`: a spec string or a loaded TaskData.
    `objective`: what to optimise and report (default: the task's own, else classification).
    `sweep`: {option: [values]} trains every combination together (side methods only) and returns the sweep
    summary instead of one run's results.
    `cache`: a feature-cache directory (thrifty.features); a side method then trains from the cached taps
    (the directory is created or completed first), which gives the same result as training on the inputs.
    `remote`: URL of a feature server (`thrifty serve`, bearer token in `token_file`): the backbone runs there,
    its gathered features fill the cache (default `output_dir/features`, a temporary cache removed after a
    successful run unless `keep_features`) and only the edge network runs here.
    `disk_check`: refuse (DiskSpaceError) a feature extraction the disk cannot hold (estimated before it starts)."""
    train = train or TrainConfig()
    overrides = dict(overrides or {})
    if sweep and remote:
        raise ConfigError("--remote is not supported with --sweep; fetch the features once with a single run")
    temporary = None  # the default feature cache of a --remote run without --cache
    bb = connect_remote(remote, token_file, backbone)
    if bb is None and isinstance(backbone, Backbone):
        bb = backbone
    elif bb is None:
        spec = BackboneSpec.of(backbone)
        bb = load_backbone(spec.replace(token_file=token_file) if spec.kind == "remote" and token_file else spec)
    link = RemoteFeatures(bb) if isinstance(bb, RemoteBackbone) else None
    if link is not None:
        overrides = {**bb.method_defaults(get_method(method)[0]), **overrides}
        if not cache and not output_dir:
            raise ConfigError("training from a feature server needs --cache DIR or --output")
        temporary = None if cache else os.path.join(output_dir, "features")
        cache = cache or temporary
    seed = train.seed if split_seed is None else split_seed
    task = data if isinstance(data, TaskData) else load_data(data, bb.preprocess, seed=seed, test_size=test_size)
    bb.fit_to_task_(task, seed=train.seed)  # data-shaped architectures (CTR tables); a no-op for pretrained ones
    obj = make_objective(objective if objective is not None else task.objective)
    if sweep:
        members = build_members(bb, task.num_classes, method, sweep, overrides, train, obj, output_dir)
    else:
        torch.manual_seed(train.seed)
        model = get_tuned_model(bb, make_config(method, overrides), task.num_classes, objective=obj)
        members = [Member(model, train, output_dir=output_dir)]
    models = [m.model for m in members]
    if cache:
        task = use_feature_cache(models, task, cache, train, link, disk_check)
        task.meta["feature_cache"].update(temporary=temporary is not None, kept=temporary is None or keep_features)
    trainer = Trainer(members if sweep else models[0], task, train, output_dir, objective=obj)
    trainer.check_outputs(resume, overwrite)
    steps = {}
    for m in trainer.members:
        architecture = (bb.spec or BackboneSpec(bb.name)).replace(random_init=True, checkpoint=None, token_file=None)
        spec = {
            "backbone": architecture.to_dict(),  # random weights suffice to measure memory
            "backbone_schema": bb.data_schema(),
            "method": method,
            "overrides": {
                **overrides,
                **{k: v for k, v in m.values.items() if k in m.model.config.__dataclass_fields__},
            },
            "objective": obj.name,
            "num_classes": task.num_classes,
            "seed": train.seed,
        }
        torch.manual_seed(train.seed)
        # the fresh-process peak-memory worker feeds backbone inputs: it does not describe a run on cached taps
        measure = peak_memory and trainer.dist.is_main and not cache and not sweep
        steps[m.name] = measure_step(m.model, trainer, spec, measure)
        if link is not None:
            steps[m.name].update(link.metrics())  # bytes received from the server, in total and per sample
    t0 = time.perf_counter()
    fit = trainer.fit(resume=resume, overwrite=overwrite)
    if not trainer.dist.is_main:
        return fit
    if temporary is not None and not keep_features:  # trained and tested: the fetched features are spent
        shutil.rmtree(temporary, ignore_errors=True)
    fits = {m.name: fit[m.name] for m in trainer.members} if sweep else {"": fit}
    results = {}
    for m in trainer.members:
        info = {
            **(extra or {}),
            **({"sweep": {"name": m.name, "values": m.values, "members": len(members)}} if sweep else {}),
        }
        if m.failed is None:
            results[m.name] = finish_run(
                m, task, obj, fits[m.name], steps[m.name], trainer.device, keep_checkpoint or bool(sweep), info
            )
        elif m.output_dir:
            write_json(os.path.join(m.output_dir, RESULTS_NAME), {"status": "failed", "error": m.failed, **info})
    if not sweep:
        return results[""]
    return finish_sweep(trainer, fits, list(sweep), obj, time.perf_counter() - t0, output_dir, keep_checkpoint)


def finish_sweep(
    trainer: Trainer,
    fits: dict[str, dict[str, Any]],
    keys: list[str],
    objective: Objective,
    seconds: float,
    output_dir: str | None,
    keep_checkpoint: bool,
) -> dict[str, Any]:
    """sweep.json and summary.md: every member's val and test metric, the member selected on val."""
    val, test = f"val_{objective.selection_metric}", f"test_{objective.metric_names[0]}"
    rows = []
    for m in trainer.members:
        row = {"name": m.name, **m.values, "dir": m.output_dir, "status": m.failed or "complete"}
        row.update({k: fits[m.name].get(k) for k in (val, "selected_epoch", test)})
        rows.append(row)
    summary = summarize(rows, keys, trainer.cfg.select_on_val, seconds, objective)
    if output_dir:
        write_json(os.path.join(output_dir, "sweep.json"), summary)
        write_text(os.path.join(output_dir, "summary.md"), summary["table"] + "\n")
        ck = os.path.join(output_dir, CHECKPOINT_NAME)
        if not keep_checkpoint and os.path.exists(ck):
            os.remove(ck)
    return summary


def connect_remote(
    remote: str | None, token_file: str | None, backbone: str | BackboneSpec | Backbone
) -> RemoteBackbone | None:
    """`--remote URL`: the feature server's backbone (None without one), the same as `--backbone remote:URL`;
    the backbone flags must agree with what the server runs (RemoteBackbone.connect)."""
    if remote is None:
        if token_file and not str(getattr(backbone, "name", backbone)).startswith("remote:"):
            raise ConfigError("--token-file is for --remote (a feature server); pass both or neither")
        return None
    spec = backbone.spec if isinstance(backbone, Backbone) else BackboneSpec.of(backbone)
    if spec is None or spec.checkpoint or spec.random_init:
        raise ConfigError("with --remote the server owns the backbone weights; drop --checkpoint / --random-init")
    server = BackboneSpec(f"remote:{remote}", image_size=spec.image_size, max_length=spec.max_length)
    return RemoteBackbone.connect(server.replace(token_file=token_file), expect=spec.name)


def use_feature_cache(
    models: list[TunedModel],
    task: TaskData,
    cache: str,
    train: TrainConfig,
    remote: RemoteFeatures | None = None,
    disk_check: bool = True,
) -> TaskData:
    """The task's splits replaced by the cached taps the side `models` read (extracting what is missing, from
    the `remote` feature server if given, after the free-disk check unless `disk_check` is False); the models are
    switched to read taps. Only side methods qualify: the others need the backbone's inside."""
    from thrifty.features import cached_task, roles_for

    for model in models:
        require_side(model, "train from a feature cache")
    taps = sorted({t for model in models for t in model.tap_names()})
    device = resolve_device(train.device)
    # on CPU, widen a float16 cache to the head's dtype in the one copy out of the map; on CUDA copy float16 over
    float_dtype = next(models[0].head.parameters()).dtype if device.type == "cpu" else None
    source = {}
    if remote is not None:
        remote.backbone.check_taps(taps)
        source = {"batches": remote.batches, "dtype": remote.dtype, "tap_shapes": remote.tap_shapes}
    out = cached_task(
        cache,
        models[0].backbone,
        task,
        taps,
        roles=roles_for(train.select_on_val),
        extract=int(os.environ.get("WORLD_SIZE", "1")) <= 1,  # torchrun ranks only read (thrifty extract first)
        batch_size=train.eval_bs,
        device=device,
        amp=train.amp,
        progress=train.progress,
        float_dtype=float_dtype,
        flush_denormal=train.flush_denormal,
        disk_check=disk_check,
        **source,
    )
    for model in models:
        model.read_taps_(True)
    return out


def finish_run(
    member: Member,
    task: TaskData,
    objective: Objective,
    fit: dict[str, Any],
    step: dict[str, Any],
    device: torch.device,
    keep_checkpoint: bool,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Save the adapter and write results.json (the keys every run records)."""
    model, train, output_dir = member.model, member.train, member.output_dir
    bb = model.backbone
    fit = dict(fit)
    results: dict[str, Any] = {
        "status": "complete",
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "backbone": bb.describe(),
        "task": task.describe(),
        "method": model.describe(),
        "objective": objective.describe(),
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
