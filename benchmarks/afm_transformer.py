"""AFM on a transformer: a MiniLM classifier fine-tuned on the clothing reviews (1-5 stars), compressed from a few
hundred unlabeled training texts; accuracy against the share of parameters removed, AFM vs svd_w.

1. fine-tune all of MiniLM (`minilm`, 64 tokens) with the `full` method on `reviews:1k` (train800val200, seed 0);
2. proxy set: `--proxy` training texts (labels dropped), batches of 32;
3. targets: every layer's attention output projection and FFN (`attention.output.dense`, `intermediate.dense`,
   `output.dense`: 18 Linear layers, 8.0 M of the model's 22.7 M parameters); `budget` = 1 − removed share of the
   targets' parameters; per-layer ranks from the global budget by
     afm       AFM factors, ranks by measured sensitivity (output distortion on the proxy set, Lagrangian split)
     afm-energy AFM factors, ranks by a common energy threshold
     svd_w     SVD of the weights, ranks by the same sensitivity rule
     afm+mimic afm, then feature mimicking against the original model's pooled features (no labels; AdamW
               lr 5e-5 cosine, `--mimic-epochs` passes over the proxy set)
   sensitivity is scored once per factorization and reused across budgets;
4. test accuracy on `--test-size` test reviews.

Resumable (every cell is written to the JSON at once and skipped on the next run).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/afm_transformer.py --workdir /tmp/afm-tf \\
        --output benchmarks/results/afm_transformer.json [--removed 0.1 0.2 0.33 0.5] [--proxy 256]
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch

from thrifty.backbones import BackboneSpec, load_backbone
from thrifty.compress import compress_
from thrifty.compress.afm import AFMConfig
from thrifty.data import load_data
from thrifty.io import read_json, write_json
from thrifty.train import TrainConfig, evaluate
from thrifty.train.run import run_training
from thrifty.tuners import load_tuned_model


SPEC = BackboneSpec("minilm", max_length=64)
VARIANTS = {
    "afm": {"allocation": "sensitivity"},
    "afm-energy": {"allocation": "energy"},
    "svd_w": {"allocation": "sensitivity", "init": "svd_w"},
    "afm+mimic": {"allocation": "sensitivity", "finetune": "mimic", "finetune_lr": 5e-5},
}


def finetuned(args) -> tuple:
    out = os.path.join(args.workdir, "minilm-reviews-full")
    if not os.path.isfile(os.path.join(out, "results.json")):
        cfg = TrainConfig(epochs=args.epochs, batch_size=32, seed=0, progress=False)
        run_training(
            backbone=SPEC,
            data="reviews:1k",
            method="full",
            train=cfg,
            output_dir=out,
            test_size=args.test_size,
            peak_memory=False,
            overwrite=True,
        )
    bb = load_backbone(SPEC)
    task = load_data("reviews:1k", bb.preprocess, seed=0, test_size=args.test_size)
    return load_tuned_model(bb, out).eval(), task, read_json(os.path.join(out, "results.json"))


def proxy(task, n: int) -> list:
    train = task.split("train")
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(1))[:n].tolist()
    inputs, _ = train.get_batch(sorted(idx))
    return [{k: v[i : i + 32] for k, v in inputs.items()} for i in range(0, n, 32)]  # no labels


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--output", default="benchmarks/results/afm_transformer.json")
    p.add_argument("--removed", nargs="+", type=float, default=[0.1, 0.2, 0.33, 0.5])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--proxy", type=int, default=256)
    p.add_argument("--sensitivity-samples", type=int, default=128)
    p.add_argument("--mimic-epochs", type=int, default=4)
    p.add_argument("--epochs", type=int, default=5, help="fine-tuning epochs of the original classifier")
    p.add_argument("--test-size", type=int, default=1000)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    results = read_json(args.output) if os.path.isfile(args.output) else {"cells": {}, "scores": {}}
    model, task, res = finetuned(args)
    total = sum(p.numel() for p in model.parameters())
    cells = results["cells"]
    if "original" not in cells:
        cells["original"] = {**evaluate(model, task.split("test"), 64), "params": total}
        cells["original"]["train_results"] = {k: res["metrics"].get(k) for k in ("test_accuracy", "train_seconds")}
        write_json(args.output, results)
    print(f"original: accuracy {cells['original']['accuracy']:.4f}, {total:,d} params", flush=True)
    batches = proxy(task, args.proxy)
    results["meta"] = {
        "proxy_samples": args.proxy,
        "sensitivity_samples": args.sensitivity_samples,
        "mimic_epochs": args.mimic_epochs,
        "test_size": args.test_size,
        "threads": 1,
    }
    for removed in args.removed:
        for name in args.variants:
            cell = f"{name}@{removed:g}"
            if cell in cells:
                continue
            kw = dict(VARIANTS[name])
            if kw.get("finetune") == "mimic":
                kw["finetune_epochs"] = args.mimic_epochs
            cfg = AFMConfig(budget=1.0 - removed, sensitivity_samples=args.sensitivity_samples, **kw)
            init = kw.get("init", "afm")
            m = copy.deepcopy(model)
            t0 = time.perf_counter()
            compress_(m, cfg, batches, sensitivity=results["scores"].get(init))
            seconds = time.perf_counter() - t0
            s = m.thrifty_compress["summary"]
            if cfg.allocation == "sensitivity" and init not in results["scores"]:
                results["scores"][init] = {k: v["sensitivity"] for k, v in s["layers"].items()}
            cells[cell] = {
                **evaluate(m, task.split("test"), 64),
                "params": s["params_after"],
                "removed_of_targets": 1 - s["target_params_after"] / s["target_params_before"],
                "removed_of_model": 1 - s["params_after"] / s["params_before"],
                "ranks": {k.replace("backbone.model.encoder.layer.", ""): v["rank"] for k, v in s["layers"].items()},
                "seconds": seconds,
            }
            write_json(args.output, results)
            c = cells[cell]
            print(
                f"{cell}: accuracy {c['accuracy']:.4f}, removed {100 * c['removed_of_targets']:.1f} % of targets "
                f"/ {100 * c['removed_of_model']:.1f} % of the model, {seconds:.0f} s",
                flush=True,
            )
    print(table(results))


def table(results: dict) -> str:
    cells = results["cells"]
    o = cells["original"]
    lines = [
        f"original: accuracy {100 * o['accuracy']:.2f} %, {o['params']:,d} parameters",
        "",
        "| removed (targets) | variant | removed (model) | test accuracy | Δ vs original |",
        "|---:|---|---:|---:|---:|",
    ]
    for key, c in cells.items():
        if key == "original":
            continue
        name, removed = key.rsplit("@", 1)
        lines.append(
            f"| {100 * float(removed):.0f} % | {name} | {100 * c['removed_of_model']:.1f} % | "
            f"{100 * c['accuracy']:.2f} % | {100 * (c['accuracy'] - o['accuracy']):+.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
