"""Objectives: what a task optimises and reports (head, loss, metrics, sampler, selection metric).

`get_objective(name)` / `make_objective(name, overrides)`; `register_objective(cls)` adds one (the name is
`cls.name`). Built-in: `classification`, `binary`, `causal_lm`.
"""

from __future__ import annotations

from typing import Any

from thrifty.objectives.base import Meter, Objective
from thrifty.objectives.binary import BinaryObjective, roc_auc
from thrifty.objectives.causal_lm import CausalLMObjective
from thrifty.objectives.classification import ClassificationObjective
from thrifty.registry import Registry


OBJECTIVES: Registry[type[Objective]] = Registry("objective")


def register_objective(cls: type[Objective]) -> type[Objective]:
    """Register an Objective subclass under `cls.name` (usable as a class decorator)."""
    return OBJECTIVES.register(cls.name, cls)


def available_objectives() -> list[str]:
    return OBJECTIVES.names()


def make_objective(name: str | Objective | None = None, overrides: dict[str, Any] | None = None) -> Objective:
    """An Objective instance: passed through, or built by name ('classification' when None) from options."""
    if isinstance(name, Objective):
        return name
    return OBJECTIVES.get(name or "classification").from_overrides(overrides or {})


for _cls in (ClassificationObjective, BinaryObjective, CausalLMObjective):
    register_objective(_cls)


__all__ = [
    "OBJECTIVES",
    "BinaryObjective",
    "CausalLMObjective",
    "ClassificationObjective",
    "Meter",
    "Objective",
    "available_objectives",
    "make_objective",
    "register_objective",
    "roc_auc",
]
