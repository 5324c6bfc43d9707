"""Method registry: `register_method(config_cls, model_cls)` under `config_cls.method`;
`get_tuned_model(backbone, config, num_classes, objective=...)` (PEFT's `get_peft_model`)."""

from __future__ import annotations

from typing import Any

from thrifty.objectives import Objective, make_objective
from thrifty.registry import Registry


METHODS: Registry[tuple[type, type]] = Registry("method", builtins="thrifty.tuners.methods")


def register_method(config_cls: type, model_cls: type) -> None:
    """Register a method; its name is `config_cls.method` (the string saved in adapter_config.json)."""
    METHODS.register(config_cls.method, (config_cls, model_cls))


def get_method(name: str) -> tuple[type, type]:
    return METHODS.get(name)


def available_methods() -> list[str]:
    return METHODS.names()


def make_config(name: str, overrides: dict[str, Any] | None = None):
    """Config of method `name` from `--set` style overrides (strings coerced to field types)."""
    config_cls, _ = get_method(name)
    return config_cls.from_overrides(overrides or {})


def get_tuned_model(backbone, config, num_classes: int | None = None, *, objective: Objective | str | None = None):
    """Wrap `backbone` with the method of `config` and a fresh head built by `objective` (default:
    classification, a Linear(D, num_classes) with zero bias)."""
    _, model_cls = get_method(config.method)
    obj = make_objective(objective)
    obj.check_task(num_classes)
    head = obj.build_head(backbone, obj.num_outputs(num_classes))
    return model_cls(backbone, config, head, objective=obj.name)


def model_record(model) -> dict[str, Any]:
    """What rebuilds `model` around a backbone (a compressed file's manifest keeps it): a TunedModel's method config,
    classes and objective, or a bare backbone."""
    from thrifty.tuners.base import TunedModel

    tuned = isinstance(model, TunedModel)
    return {
        "type": "tuned" if tuned else "backbone",
        "tuner": model.config.to_dict() if tuned else None,
        "num_classes": getattr(model, "num_classes", None),
        "objective": getattr(model, "objective", None),
    }


def model_from_record(backbone, record: dict[str, Any]):
    """The (untrained) model `model_record` describes, around `backbone`; KeyError / ValueError on a bad record."""
    if record["type"] != "tuned":
        return backbone
    tuner = dict(record["tuner"])
    config_cls, _ = get_method(tuner["method"])
    keep = {k: v for k, v in tuner.items() if k not in ("method", "thrifty_version", "format_version")}
    return get_tuned_model(
        backbone, config_cls.from_dict(keep), record["num_classes"], objective=record.get("objective")
    )


def load_frozen_(model, tensors: dict[str, Any], directory: str):
    """`tensors` loaded into the rebuilt `model` (strict; CheckpointError naming `directory` when they do not
    fit), every parameter frozen; returns `model`."""
    from thrifty.errors import CheckpointError

    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{directory}: saved tensors do not fit the rebuilt model ({exc})") from exc
    for p in model.parameters():
        p.requires_grad_(False)
    return model
