"""What a training step costs: bytes saved for backward on the first real batch (deterministic) and the peak
memory of one step (CUDA: max allocated; CPU: a fresh process, `python -m thrifty.train.peak_worker`)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import torch

from thrifty.metrics import saved_activation_bytes
from thrifty.metrics.memory import cuda_peak_step_bytes, training_step
from thrifty.objectives import Objective
from thrifty.runtime import to_device
from thrifty.runtime.child import child_env


def objective_loss(objective: Objective, inputs: Any):
    """`loss_fn(outputs, labels)` for thrifty.metrics.memory.training_step: the objective's loss on `inputs`."""
    return lambda outputs, labels: objective.loss(outputs, objective.targets(inputs, labels))


def measure_step(model, trainer, spec: dict[str, Any], peak_memory: bool) -> dict[str, Any]:
    """Bytes saved for backward on the trainer's first batch (per rank), and the peak memory of one step."""
    first = next(iter(trainer.sampler))
    inputs, labels = trainer.train_set.get_batch(first)
    inputs, labels = to_device(inputs, trainer.device), labels.to(trainer.device)
    loss_fn = objective_loss(trainer.objective, inputs)
    model.train()
    saved = saved_activation_bytes(model, lambda: training_step(model, inputs, labels, None, loss_fn))
    model.zero_grad(set_to_none=True)
    out: dict[str, Any] = {"saved_activation_bytes": saved, "measured_batch_size": len(first)}
    if not peak_memory:
        return out
    if trainer.device.type == "cuda":
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)
        out.update(
            peak_memory_bytes=cuda_peak_step_bytes(model, inputs, labels, opt, loss_fn),
            peak_memory_kind="cuda_max_memory_allocated",
        )
        model.zero_grad(set_to_none=True)
    else:
        res = peak_step_memory_subprocess(
            {**spec, "batch_size": len(first), "timed_steps": 0, "threads": torch.get_num_threads()}
        )
        out.update(peak_memory_bytes=res["peak_memory_bytes"], peak_memory_kind="cpu_rss_growth_fresh_process")
    return out


def peak_step_memory_subprocess(spec: dict[str, Any], timeout: float = 1800) -> dict[str, Any]:
    """Run `thrifty.train.peak_worker` on `spec` in a fresh process; returns its JSON answer."""
    # a fixed mmap threshold makes glibc return large freed blocks at once, so RSS tracks live tensors
    env = child_env({"MALLOC_MMAP_THRESHOLD_": "131072"})
    proc = subprocess.run(
        [sys.executable, "-m", "thrifty.train.peak_worker"],
        input=json.dumps(spec),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"peak-memory worker failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
