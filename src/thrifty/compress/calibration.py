"""The one calibration protocol of every data-driven compression method (conventions.md §7.3):

    quantize_(model, Config(step="prepare"))            # insert observers
    for batch in calibration_batches: model(batch)      # the user runs batches (no labels needed)
    quantize_(model, Config(step="convert"))            # compute scales / compensation, rewrite the model

plus `step="prepare_for_loading"` (build the converted structure, then load a saved state dict). One string
vocabulary, validated here and nowhere else. `protocol_handler(prepare, convert, prepare_for_loading)` turns a
method's three steps into the `apply` of its registration (thrifty.compress.registry), so `compress_` and
`quantize_` run the one-call form `compress_(model, config, calib_batches)` the same way for every method.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from enum import StrEnum
from typing import Any

import torch

from thrifty.compress.progress import progress_bar, stage
from thrifty.errors import ConfigError


class CalibrationStep(StrEnum):
    PREPARE = "prepare"
    CONVERT = "convert"
    PREPARE_FOR_LOADING = "prepare_for_loading"


STEPS = tuple(s.value for s in CalibrationStep)


def check_step(step: str | CalibrationStep) -> str:
    """Validate a calibration step; returns the plain string."""
    value = step.value if isinstance(step, CalibrationStep) else step
    if value not in STEPS:
        raise ConfigError(f"`step` {step!r} is not one of {', '.join(STEPS)}")
    return value


def batch_inputs(batch: Any) -> Any:
    """The model inputs of a calibration batch: `(inputs, labels)` pairs from a DataLoader lose their labels."""
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ConfigError("empty calibration batch")
        return batch[0]
    return batch


def batch_size(inputs: Any) -> int:
    if isinstance(inputs, dict):
        return int(next(iter(inputs.values())).shape[0])
    return int(inputs.shape[0])


def slice_inputs(inputs: Any, n: int) -> Any:
    if isinstance(inputs, dict):
        return {k: v[:n] for k, v in inputs.items()}
    return inputs[:n]


def iter_inputs(batches: Iterable[Any], max_samples: int | None = None) -> Iterator[Any]:
    """Yield model inputs from `batches`, stopping after `max_samples` samples (the last batch is cut)."""
    seen = 0
    for batch in batches:
        inputs = batch_inputs(batch)
        n = batch_size(inputs)
        if max_samples is not None and seen + n > max_samples:
            n = max_samples - seen
            if n <= 0:
                return
            inputs = slice_inputs(inputs, n)
        seen += n
        yield inputs
        if max_samples is not None and seen >= max_samples:
            return


@torch.no_grad()
def run_calibration(model: torch.nn.Module, batches: Iterable[Any], max_samples: int | None = None) -> int:
    """Run `model` on calibration batches (eval mode, no grad) between prepare and convert; returns samples seen."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    seen = 0
    total = _sample_count(batches, max_samples)
    with stage("calibration pass") as info, progress_bar(total=total, desc="calibration", unit="sample") as bar:
        for inputs in iter_inputs(batches, max_samples):
            inputs = {k: v.to(device) for k, v in inputs.items()} if isinstance(inputs, dict) else inputs.to(device)
            model(inputs)
            seen += batch_size(inputs)
            bar.update(batch_size(inputs))
        info["note"] = f"{seen} samples"
    model.train(was_training)
    if seen == 0:
        raise ConfigError("calibration saw no samples; pass a non-empty iterable of batches")
    return seen


def _sample_count(batches: Iterable[Any], max_samples: int | None) -> int | None:
    """Samples a calibration pass will see, when `batches` knows its size (a DataLoader), else `max_samples`."""
    dataset = getattr(batches, "dataset", None)
    try:
        n = len(dataset) if dataset is not None else None
    except TypeError:
        n = None
    if n is None:
        return max_samples
    return n if max_samples is None else min(n, max_samples)


StepFn = Callable[..., Any]


def protocol_handler(
    prepare: StepFn, convert: StepFn, prepare_for_loading: StepFn | None = None
) -> Callable[..., None]:
    """The registry's `apply` for a method with the three protocol steps, dispatching on `config.step`:

        prepare(model, config, filter_fn)          # step="prepare" (observers in)
        convert(model, config)                     # step="convert"
        prepare_for_loading(model, spec, config)   # step="prepare_for_loading" (with the saved `spec`)

    With `calib` (step="prepare"): prepare -> `run_calibration` on at most `config.calib_samples` samples (when the
    config has that field) -> convert, in one call.
    """

    def apply(model: torch.nn.Module, config: Any, calib: Iterable[Any] | None = None, *, filter_fn=None, spec=None):
        step = check_step(config.step)
        if calib is not None:
            if step != "prepare":
                raise ConfigError(
                    f"`calib_data` runs prepare -> batches -> convert; pass step='prepare', not {step!r}"
                )
            prepare(model, config, filter_fn)
            run_calibration(model, calib, getattr(config, "calib_samples", None))
            convert(model, config)
        elif step == "prepare":
            prepare(model, config, filter_fn)
        elif step == "convert":
            convert(model, config)
        elif prepare_for_loading is None:
            raise ConfigError(f"{type(config).__name__} has no step='prepare_for_loading'")
        elif spec is None:
            raise ConfigError(
                "step='prepare_for_loading' needs the saved `spec` (use thrifty.compress.load_compressed)"
            )
        else:
            prepare_for_loading(model, spec, config)

    return apply
