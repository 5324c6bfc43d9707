"""Objectives: what a task optimises and reports (head, loss, metrics, sampler, selection metric).

`make_objective(name, overrides)`; `register_objective(cls)` adds one (the name is `cls.name`). A name may carry
options: `long_tail:criterion=cb,mixup=0.2`. Built-in: `classification`, `binary`, `causal_lm`, `long_tail`.
"""

from __future__ import annotations

from typing import Any

from thrifty.errors import ConfigError
from thrifty.objectives.base import Meter, Objective
from thrifty.objectives.binary import BinaryObjective, roc_auc
from thrifty.objectives.causal_lm import CausalLMObjective
from thrifty.objectives.classification import ClassificationObjective
from thrifty.objectives.long_tail import LongTailMeter, LongTailObjective, long_tail_metrics
from thrifty.registry import Registry


OBJECTIVES: Registry[type[Objective]] = Registry("objective")


def register_objective(cls: type[Objective]) -> type[Objective]:
    """Register an Objective subclass under `cls.name` (usable as a class decorator)."""
    return OBJECTIVES.register(cls.name, cls)


def available_objectives() -> list[str]:
    return OBJECTIVES.names()


def make_objective(name: str | Objective | None = None, overrides: dict[str, Any] | None = None) -> Objective:
    """An Objective instance: passed through, or built by name ('classification' when None) from options; options
    may also follow the name (`long_tail:criterion=cb,mixup=0.2`; `overrides` win)."""
    if isinstance(name, Objective):
        return name
    base, options = parse_objective_spec(name or "classification")
    return OBJECTIVES.get(base).from_overrides({**options, **(overrides or {})})


def parse_objective_spec(spec: str) -> tuple[str, dict[str, str]]:
    """'long_tail:criterion=cb,mixup=0.2' -> ('long_tail', {'criterion': 'cb', 'mixup': '0.2'}); separators are
    ',' or ':' outside brackets (`class_counts=[5,3,1]`)."""
    name, _, rest = spec.partition(":")
    items, depth, cur = [], 0, ""
    for ch in rest:
        depth += (ch == "[") - (ch == "]")
        if ch in ",:" and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    items.append(cur)
    options = {}
    for item in filter(None, (i.strip() for i in items)):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"objective option {item!r} in {spec!r}: expected KEY=VALUE")
        options[key.strip()] = value.strip()
    return name, options


for _cls in (ClassificationObjective, BinaryObjective, CausalLMObjective, LongTailObjective):
    register_objective(_cls)


__all__ = [
    "OBJECTIVES",
    "BinaryObjective",
    "CausalLMObjective",
    "ClassificationObjective",
    "LongTailMeter",
    "LongTailObjective",
    "Meter",
    "Objective",
    "available_objectives",
    "long_tail_metrics",
    "make_objective",
    "parse_objective_spec",
    "register_objective",
    "roc_auc",
]
