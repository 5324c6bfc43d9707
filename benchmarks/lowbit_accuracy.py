"""Accuracy and bytes per task of 1-bit vs 32-bit Bi-LoRA / Bi-AdaptFormer on a real task (default `reviews:1k`
on `minilm`), several seeds. Writes JSON and prints a Markdown table.

Protocol (VTAB-1K style, no test-set selection; side-tuning.md §0.1 trap 2):
1. scale search (skipped when --scales names one value: that scale is used as given): for each method x bits and
   each s in --scales, train on train800 (one run per --search-seeds) and keep each run's best epoch on val200;
   pick the s with the best val accuracy averaged over the search seeds (ties: the first s in --scales). val200 is
   200 samples (0.5 points each): one search seed can pick a scale on a one-sample difference, so several search
   seeds give a steadier choice;
2. final: with that s, train on train800val200 for --epochs, one run per seed in --seeds; report test accuracy
   (mean +- std), the adapter's safetensors bytes and the reference `.bin` bytes (adapters + head).

Finished runs are reused (results.json in the run dir), so an interrupted benchmark restarts where it stopped.

Full run (the lead's command; see the estimate printed by --tiny runs and docs/methods.md):
    PYTHONPATH=src python benchmarks/lowbit_accuracy.py --output runs/lowbit-reviews
Smoke check:
    PYTHONPATH=src python benchmarks/lowbit_accuracy.py --output /tmp/lowbit-smoke --epochs 1 --test-size 100 \\
        --max-length 32 --scales 0.1 1 --seeds 0
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

import torch

from thrifty.backbones import BackboneSpec
from thrifty.cli.common import print_table
from thrifty.io import write_json
from thrifty.metrics import environment
from thrifty.runtime import resolve_device
from thrifty.train import RESULTS_NAME, TrainConfig, run_training


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="minilm")
    p.add_argument("--data", default="reviews:1k")
    p.add_argument("--methods", nargs="+", default=["bi_lora", "bi_adaptformer"])
    p.add_argument("--bits", nargs="+", type=int, default=[1, 32])
    p.add_argument("--dim", type=int, default=32, help="adapter width (the paper's 32 or 1)")
    p.add_argument("--bi-head", action="store_true", help="also quantize the head to 1 bit")
    p.add_argument("--scales", nargs="+", type=float, default=[0.01, 0.1, 1.0, 10.0, 100.0])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--search-seeds", nargs="+", type=int, default=[0], help="seeds of the scale search runs")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the 1k draw (fixed across seeds)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW lr (the reference's 1e-3)")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--warmup-epochs", type=float, default=2.0)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--test-size", type=int, help="cap the test split (smoke checks)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--output", required=True, help="benchmark directory (runs, summary.json)")
    return p.parse_args(argv)


def one_run(args, method: str, bits: int, scale: float, seed: int, search: bool) -> dict[str, Any]:
    tag = f"{'search' if search else 'final'}/{method}-bits{bits}-dim{args.dim}-s{scale:g}-seed{seed}"
    out = os.path.join(args.output, tag)
    done = os.path.join(out, RESULTS_NAME)
    if os.path.isfile(done):
        with open(done) as fh:
            return json.load(fh)
    t0 = time.perf_counter()
    res = run_training(
        backbone=BackboneSpec(args.backbone, max_length=args.max_length),
        data=args.data,
        method=method,
        overrides={"bits": bits, "dim": args.dim, "scale": scale, "bi_head": args.bi_head},
        train=TrainConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            weight_decay=args.weight_decay,
            warmup_epochs=args.warmup_epochs,
            seed=seed,
            device=args.device,
            select_on_val=search,
            progress=False,
        ),
        output_dir=out,
        test_size=args.test_size,
        split_seed=args.split_seed,
        overwrite=True,
        peak_memory=False,
        extra={"benchmark": "lowbit_accuracy", "phase": "search" if search else "final"},
    )
    m = res["metrics"]
    print(
        f"  {tag}: val {m.get('val_accuracy', float('nan')):.4f} test {m['test_accuracy']:.4f} "
        f"({time.perf_counter() - t0:.0f} s)",
        flush=True,
    )
    return res


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, t_start = [], time.perf_counter()
    for method in args.methods:
        for bits in args.bits:
            search_seeds = args.search_seeds if len(args.scales) > 1 else []  # one scale: fixed, nothing to search
            val_runs = {
                s: [one_run(args, method, bits, s, sd, True)["metrics"]["val_accuracy"] for sd in search_seeds]
                for s in args.scales
            }
            val = {s: statistics.mean(v) if v else None for s, v in val_runs.items()}
            best = max(args.scales, key=lambda s: (val[s] or 0.0, -args.scales.index(s)))
            finals = [one_run(args, method, bits, best, seed, False) for seed in args.seeds]
            accs = [r["metrics"]["test_accuracy"] for r in finals]
            desc = finals[0]["method"]
            rows.append(
                {
                    "method": method,
                    "bits": bits,
                    "dim": args.dim,
                    "bi_head": args.bi_head,
                    "scale": best,
                    "val_by_scale": val,
                    "val_runs_by_scale": val_runs,
                    "val_accuracy": val[best],
                    "test_accuracy": accs,
                    "test_mean": 100 * statistics.mean(accs),
                    "test_std": 100 * statistics.stdev(accs) if len(accs) > 1 else 0.0,
                    "adapter_params": desc["adapter_params"],
                    "safetensors_bytes": finals[0]["metrics"]["adapter_bytes"],
                    "bin_adapter_bytes": desc["bin_adapter_bytes"],
                    "bin_bytes": desc["bin_bytes"],
                    "seconds_per_epoch": statistics.mean(r["metrics"]["seconds_per_epoch"] for r in finals),
                }
            )
    summary = {
        "benchmark": "lowbit_accuracy",
        "args": vars(args),
        "protocol": "scale chosen on val200 (train800, best epoch); final runs on train800val200, test reported",
        "rows": rows,
        "wall_seconds": time.perf_counter() - t_start,
        "env": environment(resolve_device(args.device)),
    }
    write_json(os.path.join(args.output, "summary.json"), summary)
    print(f"\n{args.data} on {args.backbone}, dim {args.dim}, seeds {args.seeds} (test accuracy %, mean +- std)")
    for r in rows:
        r["test"] = f"{r['test_mean']:.2f} +- {r['test_std']:.2f}"
    print_table(
        rows,
        [
            ("method", "method"),
            ("bits", "bits"),
            ("scale", "s (val)"),
            ("val_accuracy", "val acc"),
            ("test", "test acc %"),
            ("adapter_params", "adapter params"),
            ("bin_adapter_bytes", ".bin adapters B"),
            ("bin_bytes", ".bin total B"),
            ("safetensors_bytes", "safetensors B"),
            ("seconds_per_epoch", "s/epoch"),
        ],
    )
    print(f"wall time {time.perf_counter() - t_start:.0f} s; summary in {os.path.join(args.output, 'summary.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
