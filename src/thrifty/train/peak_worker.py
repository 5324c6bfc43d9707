"""Fresh-process worker: build backbone + method from a JSON spec on stdin, run one warm-up step, then measure
one training step (peak memory growth, seconds, saved bytes) and print a JSON line."""

from __future__ import annotations

import json
import sys
import time

import torch


def main() -> None:
    spec = json.loads(sys.stdin.read())
    from thrifty.backbones import BackboneSpec, load_backbone
    from thrifty.metrics.memory import cpu_peak_growth, cuda_peak_step_bytes, saved_activation_bytes, training_step
    from thrifty.objectives import make_objective
    from thrifty.train.measure import objective_loss
    from thrifty.train.optim import build_optimizer
    from thrifty.tuners import get_tuned_model, make_config

    torch.manual_seed(spec.get("seed", 0))
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    device = torch.device(spec.get("device", "cpu"))
    bb = load_backbone(BackboneSpec.from_dict(spec["backbone"]))
    if spec.get("backbone_schema"):
        bb.build_from_schema_(spec["backbone_schema"], seed=spec.get("seed", 0))
    objective = make_objective(spec.get("objective"))
    config = make_config(spec["method"], spec.get("overrides", {}))
    model = get_tuned_model(bb, config, spec["num_classes"], objective=objective)
    model.to(device).train()
    inputs = bb.random_inputs(spec["batch_size"], seed=spec.get("seed", 0))
    inputs = {k: v.to(device) for k, v in inputs.items()} if isinstance(inputs, dict) else inputs.to(device)
    labels = torch.randint(0, spec["num_classes"] or 2, (spec["batch_size"],), device=device)
    loss = objective_loss(objective, inputs)
    opt = build_optimizer(model, 1e-4, 0.0)
    saved = saved_activation_bytes(model, lambda: training_step(model, inputs, labels, None, loss))
    opt.zero_grad(set_to_none=True)
    training_step(model, inputs, labels, opt, loss)  # warm-up: allocates optimizer state and grad buffers
    t0 = time.perf_counter()
    if device.type == "cuda":
        peak = cuda_peak_step_bytes(model, inputs, labels, opt, loss)
    else:
        peak = cpu_peak_growth(lambda: training_step(model, inputs, labels, opt, loss))
    seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(int(spec.get("timed_steps", 1))):
        training_step(model, inputs, labels, opt, loss)
    if device.type == "cuda":
        torch.cuda.synchronize()
    step_seconds = (time.perf_counter() - t0) / max(1, int(spec.get("timed_steps", 1)))
    print(
        json.dumps(
            {
                "saved_activation_bytes": saved,
                "peak_memory_bytes": peak,
                "step_seconds": step_seconds if spec.get("timed_steps", 1) else seconds,
                "trainable_params": model.num_trainable(),
                "adapter_params": model.num_trainable(include_head=False),
            }
        )
    )


if __name__ == "__main__":
    main()
