"""BTM, "Balanced Training and Merging" (Yu, Du & Wu 2024; longtail-ssl.md §1.2), as its repository runs it:

    stage 1   theta0 <- train on the whole long-tailed set (MiSLAS stage 1: CE + mixup)        -> stage1/
    subsets   S_m = per class, the first min(n_c, K) of an independent seeded shuffle, m = 1..M -> subsets.json
    fine-tune theta_m <- train(theta0, S_m), one independent run per subset                    -> subset<m>/
    merge     theta = (1/M) sum_m theta_m (every tensor, BatchNorm statistics too), or greedy soup -> merged/
    stage 2   classifier re-training on class-balanced batches (MiSLAS stage 2: LAS, shift BN,
              LWS; or GML)                                                                      -> stage2/
    results   output_dir/results.json: the final model's test metrics, every stage's metrics, times

Inference costs one model. Every stage writes its directory (adapter files + results.json) and is skipped when
complete, so a killed run resumes at the subset level (a subset killed mid-way resumes from its own per-epoch
checkpoint). Subset fine-tunes are independent: `workers=N` runs them in N processes (`python -m
thrifty.longtail.worker DIR M`), and under `torchrun` rank r fine-tunes subsets r, r + W, ... alone (no data
parallel), then rank 0 merges and runs stage 2. `theta0=DIR` reuses a finished run (e.g. the mixup baseline)
as stage 1.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import time
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from thrifty.backbones import Backbone, BackboneSpec
from thrifty.data import TaskData, balanced_subsets, load_data
from thrifty.errors import ConfigError, ResultsExistError
from thrifty.io import read_json, write_json
from thrifty.longtail.merge import average_states, greedy_soup
from thrifty.longtail.plan import (
    METRICS,
    PLAN,
    SUBSETS,
    BTMConfig,
    build_backbone,
    objective_spec,
    rank,
    read_json_roundtrip,
    stage_complete,
    stage_results,
    train_device,
    train_dict,
    train_seconds,
)
from thrifty.longtail.stage2 import retrain_classifier
from thrifty.objectives import LongTailObjective, make_objective
from thrifty.train import TrainConfig, Trainer, evaluate
from thrifty.train.distributed import barrier, init_distributed
from thrifty.train.run import finish_run, run_training, use_feature_cache
from thrifty.train.trainer import RESULTS_NAME, Member
from thrifty.tuners import TunedModel, get_method, get_tuned_model, make_config


class BTMRun:
    """One BTM run directory; `BTMRun.create(...)` or `BTMRun.open(dir)`, then `.run()`."""

    def __init__(self, output_dir: str, plan: dict[str, Any]):
        self.dir, self.plan = output_dir, plan
        self.config = BTMConfig(**plan["btm"])
        self.stage1_cfg, self.finetune_cfg = TrainConfig(**plan["stage1"]), TrainConfig(**plan["finetune"])
        self.stage2_cfg = TrainConfig(**plan["stage2_train"])
        self._ctx: tuple[Backbone, TaskData] | None = None
        self._raw_task: TaskData | None = None  # the task before the feature cache replaced its splits

    # --- plan --------------------------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        output_dir: str,
        *,
        backbone: str | BackboneSpec,
        data: str,
        method: str,
        overrides: dict[str, Any] | None = None,
        objective: Any = "long_tail:mixup=0.2",
        stage1: TrainConfig | None = None,
        finetune: TrainConfig | None = None,
        stage2: TrainConfig | None = None,
        config: BTMConfig | None = None,
        theta0: str | None = None,
        split_seed: int | None = None,
        test_size: int | None = None,
        cache: str | None = None,
        resume: bool = False,
        overwrite: bool = False,
    ) -> BTMRun:
        if not isinstance(data, str):
            raise ConfigError("BTM takes a data spec string (worker processes reload it), e.g. fashion-mnist:lt100")
        stage1 = stage1 or TrainConfig()
        config = config or BTMConfig()
        stage1_lr = stage1.lr if stage1.lr is not None else get_method(method)[0].default_lr  # the method's default
        plan = {
            "backbone": BackboneSpec.of(backbone).to_dict(),
            "data": data,
            "method": method,
            "overrides": {k: str(v) for k, v in (overrides or {}).items()},
            "objective": objective_spec(objective),
            "stage1": train_dict(stage1),
            "finetune": train_dict(finetune or stage1),
            # MiSLAS stage 2: 10 epochs, classifier lr x 0.05
            "stage2_train": train_dict(stage2 or dataclasses.replace(stage1, epochs=10, lr=stage1_lr * 0.05)),
            "btm": asdict(config),
            "theta0": os.path.abspath(theta0) if theta0 else None,
            "split_seed": stage1.seed if split_seed is None else split_seed,
            "test_size": test_size,
            "cache": os.path.abspath(cache) if cache else None,
        }
        plan = read_json_roundtrip(plan)
        path = os.path.join(output_dir, PLAN)
        if rank() != 0:  # under torchrun rank 0 checks and writes the plan; the others only read their arguments
            return cls(output_dir, plan)
        if os.path.exists(path):
            if overwrite:
                shutil.rmtree(output_dir)
            elif not resume:
                raise ResultsExistError(f"{output_dir} holds a BTM run; pass resume=True (--resume) or overwrite")
            elif read_json(path) != plan:
                raise ConfigError(f"{path} was written for another BTM configuration; use a new output directory")
        os.makedirs(output_dir, exist_ok=True)
        write_json(path, plan)
        return cls(output_dir, plan)

    @classmethod
    def open(cls, output_dir: str) -> BTMRun:
        return cls(output_dir, read_json(os.path.join(output_dir, PLAN)))

    def path(self, *parts: str) -> str:
        return os.path.join(self.dir, *parts)

    # --- context -----------------------------------------------------------------------------------------------
    def context(self) -> tuple[Backbone, TaskData]:
        """The backbone (pristine: models are built on copies) and the task (from the feature cache if any)."""
        if self._ctx is None:
            p = self.plan
            bb = build_backbone(p["backbone"])
            task = self._raw_task = load_data(p["data"], bb.preprocess, seed=p["split_seed"], test_size=p["test_size"])
            if p["cache"]:
                probe = get_tuned_model(copy.deepcopy(bb), self._method_config(), task.num_classes)
                task = use_feature_cache([probe], task, p["cache"], self.stage1_cfg)
            self._ctx = (bb, task)
        return self._ctx

    def _method_config(self):
        return make_config(self.plan["method"], self.plan["overrides"])

    def class_counts(self) -> list[int]:
        _, task = self.context()
        return np.bincount(task.split(self.stage1_cfg.train_role).labels, minlength=task.num_classes).tolist()

    def objective(self) -> LongTailObjective:
        """The run's objective with the counts of the whole long-tailed training split (subsets keep the groups)."""
        obj = make_objective(self.plan["objective"])
        if not isinstance(obj, LongTailObjective):
            raise ConfigError(f"BTM needs the long_tail objective, got {obj.name!r}")
        _, task = self.context()
        obj.fit_data(task.split(self.stage1_cfg.train_role).labels, task.num_classes, task.meta)
        obj.class_counts = list(obj.train_counts)
        return obj

    def load_model(self, directory: str) -> TunedModel:
        """A trainable model from a saved run directory, built on a copy of the backbone."""
        bb, _ = self.context()
        model = TunedModel.from_pretrained(copy.deepcopy(bb), directory, is_trainable=True, check_weights=False)
        if self.plan["cache"]:
            model.read_taps_(True)
        return model

    # --- stages ------------------------------------------------------------------------------------------------
    @property
    def theta0_dir(self) -> str:
        return self.plan["theta0"] or self.path("stage1")

    def stage1(self) -> None:
        if self.plan["theta0"] or stage_complete(self.theta0_dir):
            return
        bb, _ = self.context()
        run_training(
            backbone=copy.deepcopy(bb),
            data=self._raw_task,
            cache=self.plan["cache"],
            method=self.plan["method"],
            overrides=self.plan["overrides"],
            train=self.stage1_cfg,
            output_dir=self.theta0_dir,
            objective=self.plan["objective"],
            resume=True,
            peak_memory=False,
            extra={"btm_stage": "stage1"},
        )

    def subsets(self) -> list[np.ndarray]:
        path = self.path(SUBSETS)
        if os.path.exists(path):
            return [np.asarray(ix, np.int64) for ix in read_json(path)["indices"]]
        _, task = self.context()
        labels = task.split(self.stage1_cfg.train_role).labels
        c = self.config
        out = balanced_subsets(labels, task.num_classes, c.per_class, c.subsets, self.stage1_cfg.seed)
        counts = [np.bincount(labels[ix], minlength=task.num_classes).tolist() for ix in out]
        write_json(path, {"indices": [ix.tolist() for ix in out], "class_counts": counts, "per_class": c.per_class})
        return out

    def finetune(self, m: int) -> None:
        """Fine-tune theta0 on subset m (resumes its checkpoint); writes subset<m>/."""
        out = self.path(f"subset{m}")
        if stage_complete(out):
            return
        _, task = self.context()
        idx = self.subsets()[m]
        train = task.split(self.stage1_cfg.train_role)
        sub = TaskData(
            f"{task.name}:subset{m}",
            {"train": train.subset(idx), "test": task.split("test")},
            task.num_classes,
            "full",
            task.meta,
            "long_tail",
        )
        model = self.load_model(self.theta0_dir)
        cfg = dataclasses.replace(self.finetune_cfg, seed=self.finetune_cfg.seed * 1009 + m + 1, select_on_val=False)
        obj = self.objective()
        fit = Trainer(model, sub, cfg, out, objective=obj, data_parallel=False).fit(resume=True)
        finish_run(
            Member(model, cfg, output_dir=out),
            sub,
            obj,
            fit,
            {},
            train_device(cfg),
            False,
            {"btm_stage": f"subset{m}", "subset_size": len(idx)},
        )

    def run_subsets(self) -> None:
        pending = [m for m in range(self.config.subsets) if not stage_complete(self.path(f"subset{m}"))]
        world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
        if world > 1:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            if torch.cuda.is_available() and self.stage1_cfg.device in ("auto", "cuda"):
                torch.cuda.settrain_device(local)  # one GPU per rank
            for m in pending[rank::world]:
                self.finetune(m)
            self._sync()
            return
        if self.config.workers == 1 or len(pending) <= 1:
            for m in pending:
                self.finetune(m)
            return
        from thrifty.longtail.worker import run_workers

        run_workers(self.dir, pending, self.config.workers)

    def merge(self) -> None:
        out = self.path("merged")
        if stage_complete(out):
            return
        dirs = [self.path(f"subset{m}") for m in range(self.config.subsets)]
        model = self.load_model(dirs[0])
        states = [self.load_model(d).adapter_state_dict() for d in dirs]
        info: dict[str, Any] = {"merge": self.config.merge, "members": list(range(len(states)))}
        _, task = self.context()
        obj = self.objective()
        if self.config.merge == "greedy":
            role = self.config.soup_role
            if role == "val" and not task.has("val"):
                raise ConfigError(
                    "the greedy soup selects on a val split and this task has none: add one with the long-tail "
                    "modifier's -val<N> (e.g. fashion-mnist:lt100-max1000-val100), use a :1k task, or "
                    "soup_role='train' (selects on the training split)"
                )
            split = task.split("val" if role == "val" else self.stage1_cfg.train_role)

            def score(state):
                model.load_adapter_state_dict(state)
                return self._evaluate(model, split, obj)[self.config.soup_metric]

            merged, used, singles = greedy_soup(states, score)
            info.update(members=used, single_scores=singles, soup_role=role, soup_metric=self.config.soup_metric)
        else:
            merged = average_states(states)
        model.load_adapter_state_dict(merged)
        metrics = {f"test_{k}": v for k, v in self._evaluate(model, task.split("test"), obj).items()}
        model.save_pretrained(out)
        write_json(
            os.path.join(out, RESULTS_NAME),
            {"status": "complete", "metrics": metrics, "merge": info, "task": task.describe()},
        )

    def _evaluate(self, model, split, obj) -> dict[str, Any]:
        return evaluate(model, split, self.stage1_cfg.eval_bs, train_device(self.stage1_cfg), objective=obj)

    def stage2(self) -> None:
        s2 = self.config.stage2
        out = self.path("stage2")
        if s2 is None or stage_complete(out):
            return
        retrain_classifier(
            self.load_model(self.path("merged")),
            self.context()[1],
            self.stage2_cfg,
            s2,
            self.class_counts(),
            out,
            extra={"btm_stage": "stage2"},
        )

    # --- all ---------------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        times = {}
        for name, step in (("stage1", self.stage1), ("subsets", self.subsets), ("finetune", self.run_subsets)):
            t0 = time.perf_counter()
            step()
            self._sync()  # torchrun: rank 0's stage-1 files and subsets.json exist before anyone reads them
            times[name] = time.perf_counter() - t0
        if rank() != 0:
            return {}
        for name, step in (("merge", self.merge), ("stage2", self.stage2)):
            t0 = time.perf_counter()
            step()
            times[name] = time.perf_counter() - t0
        return self.summarize(times)

    def _sync(self) -> None:
        """A barrier across torchrun ranks (a no-op in one process)."""
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            barrier(init_distributed(train_device(self.stage1_cfg)))

    def summarize(self, session_seconds: dict[str, float]) -> dict[str, Any]:
        """results.json: final metrics (stage 2, else merged), every stage's metrics and training seconds."""

        def metrics(d: str) -> dict[str, Any]:
            return stage_results(d).get("metrics", {})

        subs = [metrics(self.path(f"subset{m}")) for m in range(self.config.subsets)]
        under = {}
        for k in METRICS:
            vals = [s.get(f"test_{k}") for s in subs if s.get(f"test_{k}") is not None]
            under[f"test_{k}"] = float(np.mean(vals)) if vals else None
        pcs = [s["test_per_class_accuracy"] for s in subs if s.get("test_per_class_accuracy")]
        if pcs and all(None not in p for p in pcs):
            under["test_per_class_accuracy"] = np.mean(np.array(pcs, float), 0).tolist()
        final_dir = self.path("stage2") if self.config.stage2 is not None else self.path("merged")
        seconds = {
            "stage1": train_seconds(self.theta0_dir),
            "finetune": sum(train_seconds(self.path(f"subset{m}")) for m in range(self.config.subsets)),
            "stage2": train_seconds(self.path("stage2")) if self.config.stage2 is not None else 0.0,
        }
        results = {
            "status": "complete",
            "method": "btm",
            "metrics": metrics(final_dir),
            "stages": {
                "stage1": metrics(self.theta0_dir),
                "subsets": subs,
                "undersample_mean": under,
                "merged": metrics(self.path("merged")),
                "stage2": metrics(self.path("stage2")),
            },
            "train_seconds": {**seconds, "total": sum(seconds.values())},
            "session_seconds": session_seconds,
            "plan": self.plan,
        }
        write_json(self.path(RESULTS_NAME), results)
        return results


__all__ = ["BTMConfig", "BTMRun", "build_backbone"]
