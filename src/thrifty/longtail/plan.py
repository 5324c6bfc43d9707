"""BTM's plan and stage bookkeeping (thrifty.longtail.btm runs it): the config, the metrics every stage reports,
the run directory's file names, and what a stage directory says about itself (complete, train seconds)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from thrifty.backbones import Backbone, BackboneSpec, load_backbone
from thrifty.errors import ConfigError
from thrifty.io import read_json
from thrifty.longtail.stage2 import Stage2Config
from thrifty.objectives import LongTailObjective
from thrifty.train import TrainConfig
from thrifty.train.trainer import RESULTS_NAME


PLAN = "plan.json"
SUBSETS = "subsets.json"
METRICS = tuple(m for m in LongTailObjective.metric_names if m != "loss")  # what every stage reports


@dataclass
class BTMConfig:
    """M subsets of K per class; merge `uniform` (BTM's reported merge) or `greedy` (its disabled `model_scoup`,
    selecting on `soup_role` by `soup_metric`); `stage2` None skips classifier re-training; `workers` processes."""

    subsets: int = 10
    per_class: int = 10
    merge: str = "uniform"
    soup_role: str = "val"
    soup_metric: str = "gmean"
    stage2: Stage2Config | None = field(default_factory=Stage2Config)
    workers: int = 1

    def __post_init__(self) -> None:
        if self.subsets < 1 or self.per_class < 1:
            raise ConfigError(f"BTM needs subsets >= 1 and per_class >= 1, got {self.subsets}, {self.per_class}")
        if self.merge not in ("uniform", "greedy"):
            raise ConfigError(f"BTM merge must be 'uniform' or 'greedy', got {self.merge!r}")
        if self.soup_role not in ("val", "train"):
            raise ConfigError(f"soup_role must be 'val' or 'train', got {self.soup_role!r}")
        if self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")
        if isinstance(self.stage2, dict):
            self.stage2 = Stage2Config(**self.stage2)


def build_backbone(spec: str | BackboneSpec | dict) -> Backbone:
    """Load a backbone from a spec (string, BackboneSpec or its dict)."""
    return load_backbone(BackboneSpec.from_dict(spec) if isinstance(spec, dict) else spec)


def train_dict(cfg: TrainConfig) -> dict[str, Any]:
    return asdict(cfg)


def objective_spec(objective: Any) -> str:
    """An objective as a spec string (`long_tail:mixup=0.2`), so worker processes rebuild it."""
    if objective is None or isinstance(objective, str):
        return objective or "long_tail"
    opts = [f"{f.name}={getattr(objective, f.name)}" for f in dataclasses.fields(objective) if f.init]
    opts = [o for o in opts if not o.endswith("=None")]
    return f"{objective.name}:" + ",".join(o.replace(" ", "") for o in opts)


def read_json_roundtrip(obj: dict[str, Any]) -> dict[str, Any]:
    """`obj` as it reads back from JSON (so a resumed plan compares equal)."""
    import json

    return json.loads(json.dumps(obj, sort_keys=True))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def stage_results(directory: str) -> dict[str, Any]:
    """results.json of a stage directory ({} when absent: the stage has not finished)."""
    path = os.path.join(directory, RESULTS_NAME)
    return read_json(path) if os.path.isfile(path) else {}


def stage_complete(directory: str) -> bool:
    return stage_results(directory).get("status") == "complete"


def train_seconds(directory: str) -> float:
    hist = stage_results(directory).get("history") or []
    return float(sum(h.get("seconds", 0.0) for h in hist))


def train_device(cfg: TrainConfig) -> torch.device:
    from thrifty.runtime import resolve_device

    return resolve_device(cfg.device)
