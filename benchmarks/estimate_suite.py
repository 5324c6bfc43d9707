"""Estimate how long a `thrifty bench` suite takes on this machine, without running it.

For each task, ONE tiny real cell (the first method, 1 epoch, one torch thread) runs as `thrifty train` and its
CPU time (process tree, from getrusage) gives the per-cell overhead: process start, imports, backbone and data
loading, the saved-activation and peak-memory probes and the test evaluation. Per-method step costs come from
timing a few training steps and eval batches in this process (one thread, `time.process_time`, so the numbers
hold on a loaded machine). The estimate per cell is

    overhead(task) + epochs * ceil(n_train / batch) * step(task, method) + ceil(n_test / eval_batch) * eval(task)

summed over methods x seeds. CPU seconds on one core convert to wall-clock with 2 torch threads by dividing the
compute part by a speedup (1.0 .. 2.0; printed for 1.0, 1.6 and 2.0).

    python benchmarks/estimate_suite.py --suite offline --methods linear,full,lora,adaptformer --seeds 3
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

from thrifty.bench import expand, find_suite, load_suite
from thrifty.bench.runner import train_command


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def step_costs(flags: dict, method: str, sets: dict, steps: int = 3) -> dict:
    """CPU seconds of one training step and one eval batch, measured in this process on one thread."""
    from thrifty.backbones import load_backbone
    from thrifty.data import load_data
    from thrifty.runtime import to_device
    from thrifty.train.optim import build_optimizer
    from thrifty.tuners import get_tuned_model, make_config

    bb = load_backbone(
        flags["backbone"],
        checkpoint=flags.get("checkpoint"),
        pretrained=False if flags.get("random_init") else None,
        image_size=flags.get("image_size"),
        max_length=flags.get("max_length"),
    )
    task = load_data(flags["data"], bb.preprocess, seed=flags.get("split_seed") or 0, test_size=flags.get("test_size"))
    model = get_tuned_model(bb, make_config(method, sets), task.num_classes)
    train, test = task.split("train"), task.split("test")
    bs = int(flags.get("batch_size", 32))
    ebs = max(bs, 64)
    opt = build_optimizer(model, float(flags.get("lr", 1e-3)), float(flags.get("weight_decay", 1e-4)))
    x, y = torch.utils.data.default_collate([train[i] for i in range(bs)])
    xe, ye = torch.utils.data.default_collate([test[i] for i in range(min(ebs, len(test)))])
    x, xe = to_device(x, torch.device("cpu")), to_device(xe, torch.device("cpu"))
    model.train()

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    t = time.process_time()
    for _ in range(steps):
        step()
    train_step = (time.process_time() - t) / steps
    model.eval()
    with torch.no_grad():
        model(xe)
        t = time.process_time()
        for _ in range(steps):
            model(xe)
    eval_step = (time.process_time() - t) / steps * ebs / len(ye)  # scaled to a full eval batch
    return {
        "train_step": train_step,
        "eval_batch": eval_step,
        "steps_per_epoch": math.ceil(len(train) / bs),
        "eval_batches": math.ceil(len(test) / ebs),
    }


def tiny_cell_cpu(cell) -> tuple[float, float, int]:
    """(CPU seconds, wall seconds, exit code) of the cell run for 1 epoch on one thread."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as out:
        flags = {**cell.flags, "epochs": 1}
        from thrifty.bench.suite import Cell

        argv = Cell(cell.task, cell.group, cell.label, cell.method, cell.seed, flags, cell.sets).argv(out)
        t, c = time.perf_counter(), _children_cpu()
        rc = subprocess.run(
            train_command([*argv, "--no-progress"]), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        ).returncode
        return _children_cpu() - c, time.perf_counter() - t, rc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default="offline")
    p.add_argument("--methods", default=None, help="comma list (default: the suite's)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default: the suite's)")
    p.add_argument("--data-root")
    p.add_argument("--json", help="write the per-cell estimates here")
    args = p.parse_args()
    torch.set_num_threads(1)
    suite = load_suite(find_suite(args.suite))
    methods = args.methods.split(",") if args.methods else list(suite.methods)
    n_seeds = args.seeds or len(suite.seeds)
    cells = expand(suite, methods=methods, seeds=[0], data_root=args.data_root)
    rows, total_over, total_compute = [], 0.0, 0.0
    for task in suite.tasks:
        tcells = [c for c in cells if c.task == task.name]
        costs = {}
        for c in tcells:
            try:
                costs[c.label] = step_costs(c.flags, c.method, c.sets)
            except Exception as exc:  # a method that cannot run on this backbone fails fast
                costs[c.label] = {"error": f"{type(exc).__name__}: {exc}"[:160]}
        first = next(c for c in tcells if "error" not in costs[c.label])
        cpu, wall, rc = tiny_cell_cpu(first)
        k = costs[first.label]
        overhead = cpu - (k["steps_per_epoch"] * k["train_step"] + k["eval_batches"] * k["eval_batch"])
        print(
            f"{task.name}: tiny cell ({first.label}, 1 epoch, 1 thread): {cpu:.1f} CPU s, {wall:.1f} s wall, "
            f"exit {rc}; per-cell overhead {overhead:.1f} CPU s",
            flush=True,
        )
        for c in tcells:
            k = costs[c.label]
            epochs = int(c.flags.get("epochs", 10))
            if "error" in k:
                compute = 0.0
                note = "FAILS: " + k["error"]
            else:
                compute = epochs * k["steps_per_epoch"] * k["train_step"] + k["eval_batches"] * k["eval_batch"]
                note = f"step {k['train_step']:.3f} s x {k['steps_per_epoch']} x {epochs} epochs"
            rows.append(
                {"task": c.task, "method": c.label, "overhead_cpu": overhead, "compute_cpu": compute, "note": note}
            )
            total_over += n_seeds * overhead
            total_compute += n_seeds * compute
            print(
                f"  {c.label:12s} overhead {overhead:6.1f} + compute {compute:7.1f} CPU s per seed   ({note})",
                flush=True,
            )
    print(f"\n{len(rows)} (task, method) pairs x {n_seeds} seeds = {len(rows) * n_seeds} cells")
    for speedup in (1.0, 1.6, 2.0):
        wall = total_over + total_compute / speedup
        print(f"estimated wall-clock with a 2-thread speedup of {speedup}: {wall / 60:.1f} min")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows, "overhead_cpu": total_over, "compute_cpu": total_compute}, fh, indent=2)
    sys.exit(0)


if __name__ == "__main__":
    main()
